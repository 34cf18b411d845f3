"""How many threads the kernels run with, step by step.

Every parallel kernel ends when its slowest thread does. When another busy process shares a
core, the thread on that core gets a time slice only now and then, and a decode step of a
few hundred parallel regions waits for it each time: with both cores of a laptop busy, two
threads decoded at 51 tok/s where one thread did 93 (`lamina bench --contention`). Fewer
threads than idle cores lose nothing to that wait.

So unless the user fixes `threads`, the policy counts the cores other processes keep busy
(all CPU time the OS reports, including a hypervisor's steal, minus this process's own) over
the last tenth of a second or so of its own work, and runs the kernels on the cores left
over, at least one.
"""

from __future__ import annotations

import os
import time

import numba
import psutil

# numba's OpenMP workers spin for GOMP's default 300k rounds after each parallel region,
# holding the second core while BLAS or the engine's Python runs: a 512-token float32 prefill
# of the default model ran 545-567 tok/s with it and 749-777 with 10k rounds, while int8
# decode stayed the same (paired runs on Zen 4; one sequence 274-301 against 273-296 tok/s,
# sixteen 1518-1588 against 1524-1610). GOMP reads it when numba starts its thread pool, at
# the first parallel kernel, so it is set on import; a setting of the user's wins.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

# Seconds between looks at the machine's load: tens of decode steps, long enough for
# the OS's CPU counters (10 ms ticks) to mean something, short enough to follow a load.
INTERVAL_S = 0.1
# A window longer than this spans a pause in the engine's work (between requests, or while a
# benchmark peer ran): what other processes did then says little about now, so the policy
# keeps the count it last measured while working and starts a new window.
STALE_S = 5 * INTERVAL_S


# The fields of psutil.cpu_times() that are work; guest time is already inside user and nice.
_BUSY_FIELDS = ("user", "nice", "system", "irq", "softirq", "steal")


def _allowed_cpus() -> list[int]:
    """The CPUs this process may run on (taskset, a container's cpuset), as the OS numbers
    them; every CPU where the OS does not say."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(psutil.cpu_count() or 1))


class ThreadPolicy:
    """`threads()` gives the thread count for the next step; call `apply()` on the thread
    that runs the kernels (numba's thread count is per calling thread)."""

    def __init__(self, fixed: int | None = None, cores: int | None = None) -> None:
        self.fixed = fixed
        self.cores = cores or numba.config.NUMBA_NUM_THREADS
        # Only the load on the CPUs we may use counts: busy cores elsewhere take nothing from us.
        self._cpus = _allowed_cpus()
        self._process = psutil.Process()
        self._current = self.fixed or self.cores
        self._last = self._sample()

    def _sample(self) -> tuple[float, float, float]:
        """(wall seconds, busy CPU seconds of our CPUs, CPU seconds of this process)."""
        per_cpu = psutil.cpu_times(percpu=True)
        busy = sum(
            getattr(per_cpu[cpu], name, 0.0)
            for cpu in self._cpus
            if cpu < len(per_cpu)
            for name in _BUSY_FIELDS
        )
        own = self._process.cpu_times()
        return time.monotonic(), busy, own.user + own.system

    def threads(self) -> int:
        if self.fixed is not None:
            return self.fixed
        age = time.monotonic() - self._last[0]
        if age > STALE_S:
            self._last = self._sample()
        elif age >= INTERVAL_S:
            now = self._sample()
            wall, busy, own = (a - b for a, b in zip(now, self._last, strict=True))
            others = max(0.0, busy - own) / wall  # cores' worth of other processes' work
            free = min(self.cores, len(self._cpus) - others)
            self._current = max(1, round(free))
            self._last = now
        return self._current

    def spare_core(self) -> bool:
        """Whether a core is left over by the kernels' threads (for work beside them)."""
        return len(self._cpus) > self._current

    def apply(self) -> int:
        """Set numba's thread count for the calling thread; return it."""
        threads = self.threads()
        if numba.get_num_threads() != threads:
            numba.set_num_threads(threads)
        return threads
