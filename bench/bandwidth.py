"""Measured memory read bandwidth: the ceiling a memory-bound decode step is compared with."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numba
import numpy as np
from numba import njit, prange


@njit(cache=True, parallel=True, fastmath=True)
def _sum_rows(a: np.ndarray) -> float:
    """Sum a 2-D array row by row in parallel; each row is one vectorised stream."""
    out = np.zeros(a.shape[0], dtype=np.float32)
    for r in prange(a.shape[0]):
        row = a[r]
        acc = np.float32(0.0)
        for i in range(row.size):
            acc += row[i]
        out[r] = acc
    return out.sum()


def llc_bytes() -> int:
    """The last-level cache of the whole machine, as the kernel reports it: each instance of
    the highest cache level counted once (32 MiB when nothing is reported)."""
    instances: dict[int, dict[str, int]] = {}
    for index in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/cache/index*"):
        try:
            level = int((index / "level").read_text())
            text = (index / "size").read_text().strip()
            shared = (index / "shared_cpu_list").read_text().strip()
        except (OSError, ValueError):
            continue
        unit = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        instances.setdefault(level, {})[shared] = int(text.rstrip("KMG")) * unit
    return sum(instances[max(instances)].values()) if instances else 32 * 2**20


def probe_bytes() -> int:
    """How much the probe reads: at least 8x the last-level cache, so no pass hits in it."""
    return max(8 * llc_bytes(), 256 * 2**20)


def read_bandwidth_gbps(repeats: int = 7, threads: int | None = None) -> float:
    """Median GB/s of `repeats` parallel streaming reads of `probe_bytes()` with `threads`
    threads (default: numba's, as the kernels run)."""
    a = np.ones((probe_bytes() // 2**20, 2**20 // 4), dtype=np.float32)
    previous = numba.get_num_threads()
    numba.set_num_threads(threads or previous)
    try:
        _sum_rows(a)  # faults the pages in and compiles
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            _sum_rows(a)
            times.append(time.perf_counter() - t)
    finally:
        numba.set_num_threads(previous)
    return a.nbytes / statistics.median(times) / 1e9


def bandwidth_figures(repeats: int = 7) -> dict:
    """The probe with every thread and with one, and what it read."""
    return {
        "bandwidth_gbps": read_bandwidth_gbps(repeats),
        "bandwidth_1thread_gbps": read_bandwidth_gbps(repeats, threads=1),
        "bandwidth_probe_mb": probe_bytes() // 2**20,
        "llc_mb": llc_bytes() / 2**20,
    }
