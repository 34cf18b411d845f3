"""Disk -> host RAM layer streaming: run a model larger than the RAM budget.

`LayerStream` serves the decoder layers by explicit residency: `fetch(i)` returns layer i
and `release(i)` says the caller is done with it. Nothing else (reading sizes, walking the
model's weights) moves data. Resident layers come back as they are, and a streamed layer
comes back as a layer object whose arrays are views into one of a few reusable host
buffers. Fetching streamed layer i waits until its bytes are in, then starts reading the
next streamed layer (wrapping around to the first for the next forward pass) into another
buffer on a background thread, so the read overlaps layer i's compute.

Reads use os.preadv into the buffers, not a memory map: mapped pages would stay resident
(and count against the budget) after use, whereas the page cache that preadv goes through is
not charged to the process. Optionally each range is dropped from the page cache after it
is read (posix_fadvise DONTNEED), so that every pass really reads the disk.

The contract that makes two buffers enough: a consumer releases a streamed layer before it
fetches another one. The CPU backend computes synchronously, so that holds; an asynchronous
consumer must finish (or wait on an event for) its use of layer i before fetching i + 1.
A layer object kept beyond its release sees its buffer refilled with another layer. The device
stream (device_stream.py) is such a consumer: it takes a layer's raw bytes (`read_bytes`),
copies them on to the GPU, and waits for that copy before asking for the next layer.

This module knows byte ranges and dtypes, not weight formats: the caller describes each
streamed layer's tensors (`TensorSpec`) and passes a `build` function turning a dict of
arrays into its layer object.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from typing import Self  # Python 3.11+; annotations are never evaluated

# Buffers start on a cache-line boundary; each run keeps its file offset's alignment modulo
# this, so views have the same alignment as views into a memory map of the file.
_ALIGN = 64
_WORD = 4  # the least alignment of a tensor's place in a buffer: kernels read int32 words


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a streamed layer: `nbytes` at absolute file `offset`."""

    name: str
    offset: int
    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


@dataclass(frozen=True)
class LayerLayout:
    """How one layer's tensors are read: adjacent tensors are merged into runs, one read
    each, and every tensor becomes a view at a fixed place in a buffer, aligned to its item
    size and at least 4 bytes (kernels read block values as int32 words, which a GPU needs
    aligned; a checkpoint's odd-length tensors, such as a block weight's kind, can leave the
    next one's file offset odd)."""

    runs: tuple[tuple[int, int, int], ...]  # (file offset, buffer offset, length)
    views: tuple[tuple[str, slice, np.dtype, tuple[int, ...]], ...]  # name, bytes, dtype, shape
    nbytes: int  # buffer bytes it needs

    @classmethod
    def of(cls, specs: Sequence[TensorSpec]) -> LayerLayout:
        runs: list[list[int]] = []  # [file start, file end, buffer start]
        views = []
        end = 0
        for spec in sorted(specs, key=lambda s: s.offset):
            aligned = spec.offset % max(_WORD, np.dtype(spec.dtype).itemsize) == 0
            if runs and spec.offset < runs[-1][1]:
                raise ValueError(f"tensor {spec.name!r} overlaps another in the file")
            if runs and spec.offset == runs[-1][1] and aligned:
                runs[-1][1] += spec.nbytes
            else:  # a misaligned tensor (after an odd-length one) reads into its own run
                end += (spec.offset - end) % _ALIGN if aligned else -end % _ALIGN
                runs.append([spec.offset, spec.offset + spec.nbytes, end])
            run_start, run_end, buf_start = runs[-1]
            at = buf_start + spec.offset - run_start
            views.append((spec.name, slice(at, at + spec.nbytes), spec.dtype, spec.shape))
            end = buf_start + run_end - run_start
        return cls(tuple((s, b, e - s) for s, e, b in runs), tuple(views), end)

    @classmethod
    def packed(cls, arrays: Mapping[str, np.ndarray]) -> LayerLayout:
        """A layout for arrays held in memory rather than read from a file: one after
        another, each on an _ALIGN boundary (their "file offsets" are these places)."""
        specs, offset = [], 0
        for name, array in arrays.items():
            offset += -offset % _ALIGN
            specs.append(TensorSpec(name, offset, array.dtype, tuple(array.shape)))
            offset += array.nbytes
        return cls.of(specs)

    def pack(self, arrays: Mapping[str, np.ndarray], out: np.ndarray) -> None:
        """Write each array's bytes where this layout puts its tensor, into uint8 `out`:
        the image a read of the file would leave in a buffer."""
        for name, where, dtype, shape in self.views:
            array = arrays[name]
            if array.dtype != dtype or tuple(array.shape) != tuple(shape):
                raise ValueError(
                    f"{name} is {array.dtype}{array.shape}, the layout says {dtype}{shape}"
                )
            out[where] = np.ascontiguousarray(array).reshape(-1).view(np.uint8)

    def unpack(self, buffer: Any) -> dict[str, Any]:
        """{name: array} viewing the image in `buffer` (host or device bytes), no copy."""
        return {
            name: buffer[where].view(dtype).reshape(shape)
            for name, where, dtype, shape in self.views
        }


def hidden_share(wait_s: float, busy_s: float) -> float:
    """The share of `busy_s` spent by a transfer that compute did not wait for. A wait also
    counts the waiting thread's wake-up, so on a busy machine it can outlast the transfer
    itself: that is no overlap at all, not a negative one."""
    return max(0.0, 1.0 - wait_s / busy_s) if busy_s > 0 else 0.0


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9 if seconds > 0 else 0.0


@dataclass
class StreamStats:
    """Counters of a LayerStream. read_s is time the reader spent in reads; wait_s is time
    the consumer spent blocked on them, so 1 - wait_s / read_s is the share of reading that
    was hidden behind compute."""

    drop_page_cache: bool
    reads: int = 0  # layer loads
    sync_reads: int = 0  # loads that were not prefetched (random access, or one buffer)
    bytes_read: int = 0
    read_s: float = 0.0
    wait_s: float = 0.0

    @property
    def overlap(self) -> float:
        return hidden_share(self.wait_s, self.read_s)

    @property
    def read_gbps(self) -> float:
        return gbps(self.bytes_read, self.read_s)

    def describe(self) -> str:
        cache = "dropped after each read" if self.drop_page_cache else "kept"
        return (
            f"streamed {self.reads} layer loads, {self.bytes_read / 1e9:.2f} GB in "
            f"{self.read_s:.2f} s ({self.read_gbps:.2f} GB/s, page cache {cache}); compute "
            f"waited {self.wait_s:.2f} s: overlap {self.overlap:.0%}; "
            f"{self.sync_reads} unprefetched loads"
        )


@dataclass
class _Slot:
    buffer: np.ndarray
    layer: int | None = None
    future: Future | None = None
    built: Any = None  # the layer object over this buffer, once its read is done


@dataclass
class _Reader:
    """The file side, shared with the background thread (never with the LayerStream
    itself, so that an unclosed stream can still be garbage-collected and finalized)."""

    fd: int
    drop_page_cache: bool
    stats: StreamStats
    lock: threading.Lock = field(default_factory=threading.Lock)

    def read(self, layout: LayerLayout, buffer: np.ndarray) -> None:
        start = time.perf_counter()
        total = 0
        for file_offset, buffer_offset, length in layout.runs:
            view = memoryview(buffer)[buffer_offset : buffer_offset + length]
            done = 0
            while done < length:
                got = os.preadv(self.fd, [view[done:]], file_offset + done)
                if got == 0:
                    raise OSError(f"unexpected end of file at byte {file_offset + done}")
                done += got
            if self.drop_page_cache:
                os.posix_fadvise(self.fd, file_offset, length, os.POSIX_FADV_DONTNEED)
            total += length
        seconds = time.perf_counter() - start
        with self.lock:
            self.stats.reads += 1
            self.stats.bytes_read += total
            self.stats.read_s += seconds


class LayerStream:
    """The layers of a model, some resident and some read from `path` on demand.

    resident: layer index -> layer object, returned as is. streamed: layer index -> its
    tensors in the file; build(i, arrays) makes layer i's object from {name: array}.
    A layer may be neither: a consumer that serves some layers itself (the device stream
    keeps its resident and pinned layers) asks this stream only for the others.
    buffers: how many host buffers streamed layers rotate through (two: compute one while
    the next is read); allocate(nbytes) makes each one (default: aligned pageable memory;
    pinned memory when a GPU copies from them). Use as a context manager or call close():
    it stops the reader thread and closes the file.
    """

    def __init__(
        self,
        path: str | Path,
        num_layers: int,
        resident: Mapping[int, Any],
        streamed: Mapping[int, Sequence[TensorSpec]],
        build: Callable[[int, dict[str, np.ndarray]], Any],
        *,
        buffers: int = 2,
        drop_page_cache: bool = False,
        allocate: Callable[[int], np.ndarray] | None = None,
    ) -> None:
        served = sorted([*resident, *streamed])
        if len(set(served)) != len(served) or not set(served) <= set(range(num_layers)):
            raise ValueError(f"layers must be in 0..{num_layers - 1}, resident or streamed")
        if streamed and buffers < 1:
            raise ValueError(f"streaming needs at least one buffer, got {buffers}")
        if drop_page_cache and not hasattr(os, "posix_fadvise"):
            raise ValueError("dropping the page cache needs posix_fadvise, which this OS lacks")
        self._num_layers = num_layers
        self._resident = dict(resident)
        self._order = sorted(streamed)  # streamed layers in the order a forward pass uses them
        self._next = {i: self._order[(k + 1) % len(self._order)] for k, i in enumerate(self._order)}
        self._layouts = {i: LayerLayout.of(specs) for i, specs in streamed.items()}
        self._build = build
        buffer_bytes = max((lay.nbytes for lay in self._layouts.values()), default=0)
        self.stats = StreamStats(drop_page_cache)
        allocate = allocate or _aligned_empty
        self._slots = [_Slot(allocate(buffer_bytes)) for _ in range(min(buffers, len(self._order)))]
        self._current: _Slot | None = None
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        self._reader = _Reader(fd, drop_page_cache, self.stats)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lamina-stream")
        self._closed = False
        self._finalizer = weakref.finalize(self, _shut, self._executor, fd)
        for slot, layer in zip(self._slots, self._order):  # the first pass's first layers
            self._load(slot, layer)

    @property
    def streamed(self) -> tuple[int, ...]:
        """The streamed layers, in the order a forward pass uses them."""
        return tuple(self._order)

    def layout(self, index: int) -> LayerLayout:
        """Where streamed layer `index`'s tensors lie in the bytes `read_bytes` returns."""
        return self._layouts[index]

    def fetch(self, i: int) -> Any:
        """Layer i, its bytes read in: valid until `release(i)` and another fetch."""
        if not 0 <= i < self._num_layers:
            raise IndexError(f"layer {i} out of range for {self._num_layers} layers")
        if i in self._resident:
            return self._resident[i]
        slot = self._acquire(i)
        if slot.built is None:
            arrays = self._layouts[i].unpack(slot.buffer)
            for array in arrays.values():
                # read-only like a memory map's views: kernels then run the very same compiled
                # specialization for resident and streamed layers
                array.flags.writeable = False
            slot.built = self._build(i, arrays)
        return slot.built

    def release(self, i: int) -> None:
        """The caller is done with layer i: its buffer may be refilled."""
        if self._current is not None and self._current.layer == i:
            self._current = None

    def read_bytes(self, index: int) -> np.ndarray:
        """Streamed layer `index` as raw bytes laid out by `layout(index)`, for a consumer
        that copies them on whole (to a GPU). Same contract as `fetch`: the bytes stay
        valid until another streamed layer is asked for."""
        slot = self._acquire(index)
        return slot.buffer[: self._layouts[index].nbytes]

    def _acquire(self, i: int) -> _Slot:
        """The slot holding streamed layer i once its read is done; prefetch what follows."""
        if i not in self._layouts:
            raise KeyError(f"layer {i} is not streamed by this stream")
        if self._closed:
            raise ValueError("the layer stream is closed")
        slot = next((s for s in self._slots if s.layer == i), None)
        if slot is None:  # not prefetched: read it now into a buffer nobody is using
            slot = next(s for s in self._slots if s is not self._current or len(self._slots) == 1)
            self._load(slot, i)
            with self._reader.lock:
                self.stats.sync_reads += 1
        self._wait(slot)
        self._current = slot
        self._prefetch_after(i)
        return slot

    def _load(self, slot: _Slot, layer: int) -> None:
        """Queue a read of `layer` into `slot`. The single reader thread runs reads in order,
        so a read already queued for this slot's buffer finishes before this one starts."""
        slot.layer, slot.built = layer, None
        slot.future = self._executor.submit(self._reader.read, self._layouts[layer], slot.buffer)

    def _wait(self, slot: _Slot) -> None:
        """Block until the slot's read is done, counting the wait."""
        start, pending = time.perf_counter(), not slot.future.done()
        slot.future.result()  # re-raises a failed read
        if pending:
            with self._reader.lock:
                self.stats.wait_s += time.perf_counter() - start

    def _prefetch_after(self, i: int) -> None:
        """Start reading the streamed layers after i into every buffer but the current one."""
        wanted, j = [], i
        for _ in range(len(self._slots) - 1):
            j = self._next[j]
            wanted.append(j)
        held = {s.layer for s in self._slots}
        free = [s for s in self._slots if s is not self._current and s.layer not in wanted]
        for j in (j for j in wanted if j not in held):
            self._load(free.pop(0), j)

    def close(self) -> None:
        """Stop the reader (after its current read), close the file, free the buffers."""
        if self._closed:
            return
        self._closed = True
        self._finalizer()
        self._slots = []
        self._current = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _shut(executor: ThreadPoolExecutor, fd: int) -> None:
    executor.shutdown(wait=True, cancel_futures=True)
    os.close(fd)


def _aligned_empty(nbytes: int) -> np.ndarray:
    raw = np.empty(nbytes + _ALIGN, dtype=np.uint8)
    start = -raw.ctypes.data % _ALIGN
    return raw[start : start + nbytes]
