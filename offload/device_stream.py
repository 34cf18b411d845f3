"""Host -> device layer streaming: run a model larger than the GPU budget.

`DeviceLayerStream` serves the decoder layers by explicit residency, as `LayerStream` does on
the CPU: `fetch(i)` returns layer i and `release(i)` says every kernel using it is queued.
Layers resident on the device come back as they are; a streamed layer comes back as a layer object whose arrays
are views into one of a few reusable device buffers, filled by one host -> device copy of
the layer's bytes. Those bytes come from a pinned host image made once (HOST_TO_DEVICE
layers), or from a LayerStream's host staging buffer that the disk read just filled (DISK
layers).

Copies run on their own CUDA stream, so the copy of the next streamed layer overlaps the
kernels of the current one. Two events per device buffer order the two streams without the
host ever waiting: the compute stream waits for "this buffer's layer is copied" before the
layer's kernels, and the copy stream waits for "compute with this buffer's previous layer
is done" before overwriting it. The second event is recorded when the consumer releases
the layer, which is when it has queued every kernel of it (the CPU stream's contract, made
asynchronous).

A disk layer's copy is made by an uploader thread, never by the thread that queues the
kernels: it waits for the LayerStream's read into a pinned staging buffer, queues the copy,
and waits for it (timing it on the host), so the staging buffer is free before it asks for
the next disk layer, which lets the LayerStream refill it. So fetching layer i starts layer
i + 1's upload and returns at once; the engine's thread waits only for an upload not yet
done when it needs that very layer (the disk is behind), while the GPU runs the kernels
queued before. Events that order streams do not time them (`_Clock` makes its own).

Plain pinned memory, not mapped memory: kernels read the weights from device buffers,
because a tiled GEMM reads each weight several times and PCIe is far slower than device
memory, whereas one bulk copy per layer runs at the link's full bandwidth.

This module moves bytes between numba arrays on streams; it knows neither weight formats
nor the model: the caller passes each streamed layer's layout, its pinned image or the disk
stream, and a `build` function turning {name: device array} into its layer object.

Verified under numba's CUDA simulator only, which runs every copy synchronously when it is
queued and whose events do nothing: the stream and event ordering, pinned allocation and
the asynchrony of the copies are written for a real GPU but were not run on one.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from numba import config, cuda

from offload.streaming import LayerLayout, LayerStream, gbps, hidden_share

if TYPE_CHECKING:
    from typing import Self  # Python 3.11+; annotations are never evaluated

# numba's DeviceNDArray, Stream and Event (the simulator's fakes in tests): no type stubs.
DeviceArray = Any
# Event pairs kept unread before the oldest is read back (they are long done by then).
_PENDING_TIMINGS = 256


@dataclass
class DeviceStreamStats:
    """Counters of a DeviceLayerStream. copy_s is time the copy stream spent copying;
    wait_s is time compute spent blocked on copies (the compute stream waiting on a copy's
    event, and the host waiting before a disk staging buffer is reused), so
    1 - wait_s / copy_s is the share of copying hidden behind compute. `timer` says how they
    were measured: CUDA events on a GPU; host timers under the simulator, which copies
    synchronously (so nothing overlaps there, and nothing waits either)."""

    timer: str
    copies: int = 0  # layer copies
    sync_copies: int = 0  # copies that were not prefetched (random access)
    bytes_copied: int = 0
    copy_s: float = 0.0
    wait_s: float = 0.0

    @property
    def overlap(self) -> float:
        return hidden_share(self.wait_s, self.copy_s)

    @property
    def h2d_gbps(self) -> float:
        return gbps(self.bytes_copied, self.copy_s)

    def describe(self) -> str:
        return (
            f"copied {self.copies} layers host -> device, {self.bytes_copied / 1e9:.2f} GB in "
            f"{self.copy_s:.3f} s ({self.h2d_gbps:.2f} GB/s); compute waited "
            f"{self.wait_s:.3f} s: overlap {self.overlap:.0%}; {self.sync_copies} unprefetched "
            f"copies (timed by {self.timer})"
        )


class _Clock:
    """Seconds of work queued on a stream, summed lazily.

    On a GPU the work is bracketed by two events and its duration read back later, so
    timing never makes the host wait for the device; at most _PENDING_TIMINGS pairs stay
    unread. The simulator runs copies and waits synchronously when they are queued and its
    events hold no time, so there a host timer around the call measures the same thing.
    """

    def __init__(self, events: bool) -> None:
        self.events = events
        self._pending: deque[tuple[Any, Any, Callable[[float], None]]] = deque()

    def time(self, stream: Any, work: Callable[[], None], add: Callable[[float], None]) -> None:
        if not self.events:
            start = time.perf_counter()
            work()
            add(time.perf_counter() - start)
            return
        begin, end = cuda.event(), cuda.event()
        begin.record(stream)
        work()
        end.record(stream)
        self._pending.append((begin, end, add))
        if len(self._pending) > _PENDING_TIMINGS:
            self._read(*self._pending.popleft())

    def settle(self) -> None:
        """Read back every pending duration (waits for the work still running)."""
        while self._pending:
            self._read(*self._pending.popleft())

    @staticmethod
    def _read(begin: Any, end: Any, add: Callable[[float], None]) -> None:
        end.synchronize()
        add(begin.elapsed_time(end) / 1000.0)


@dataclass
class _Slot:
    """One device buffer and the two events that order its reuse."""

    buffer: DeviceArray
    copied: Any  # recorded on the copy stream after a layer's copy into the buffer
    released: Any  # recorded on the compute stream after the last kernel using the buffer
    layer: int | None = None
    built: Any = None  # the layer object over this buffer
    upload: Future | None = None  # a disk layer's copy, queued by the uploader thread


def _ordering_event() -> Any:
    """An event that orders streams without timing them (cheaper to record and wait on);
    the simulator's events take no arguments."""
    return cuda.event() if config.ENABLE_CUDASIM else cuda.event(timing=False)


class DeviceLayerStream:
    """The layers of a model, some resident on the device and some copied in on demand.

    resident: layer index -> layer object already on the device, returned as is.
    pinned: layer index -> (pinned host image, its LayerLayout), for layers kept in host RAM.
    disk: a LayerStream serving the other layers' bytes from the checkpoint (None: none).
    build(i, arrays) makes layer i's object from {name: device array}.
    compute_stream: the stream the consumer's kernels run on. device_empty(nbytes) allocates
    a device uint8 array (the backend's, so that it can account for it). buffers: how many
    device buffers streamed layers rotate through (two: compute one while the next copies).

    close() waits for the copies in flight and releases the device buffers, the pinned
    images, the events and the copy stream; it does not close `disk`, which its opener owns.
    """

    def __init__(
        self,
        num_layers: int,
        resident: Mapping[int, Any],
        pinned: Mapping[int, tuple[np.ndarray, LayerLayout]],
        disk: LayerStream | None,
        build: Callable[[int, dict[str, DeviceArray]], Any],
        compute_stream: Any,
        device_empty: Callable[[int], DeviceArray],
        *,
        buffers: int = 2,
    ) -> None:
        on_disk = () if disk is None else disk.streamed
        served = [*resident, *pinned, *on_disk]
        if sorted(served) != list(range(num_layers)):
            raise ValueError(f"every layer 0..{num_layers - 1} needs exactly one home")
        streamed = sorted([*pinned, *on_disk])
        if streamed and buffers < 1:
            raise ValueError(f"streaming needs at least one buffer, got {buffers}")
        self._num_layers = num_layers
        self._resident = dict(resident)
        self._pinned = dict(pinned)
        self._disk = disk
        self._layouts = {i: layout for i, (_, layout) in pinned.items()}
        self._layouts.update({i: disk.layout(i) for i in on_disk})
        self._next = {i: streamed[(k + 1) % len(streamed)] for k, i in enumerate(streamed)}
        self._build = build
        self._compute = compute_stream
        self._copy_stream = cuda.stream()
        self._clock = _Clock(events=not config.ENABLE_CUDASIM)
        self._stats = DeviceStreamStats("CUDA events" if self._clock.events else "host timers")
        nbytes = max((layout.nbytes for layout in self._layouts.values()), default=0)
        self._slots = [
            _Slot(device_empty(nbytes), _ordering_event(), _ordering_event())
            for _ in range(min(buffers, len(streamed)))
        ]
        self._current: _Slot | None = None
        self._stats_lock = threading.Lock()  # the uploader thread adds its copies' time
        self._uploader = None
        if on_disk:  # its CUDA calls need the context current on its thread
            self._uploader = ThreadPoolExecutor(
                1, thread_name_prefix="lamina-upload", initializer=cuda.current_context
            )
        self._closed = False
        for slot, layer in zip(self._slots, streamed):  # the first pass's first layers
            self._copy(slot, layer)

    @property
    def stats(self) -> DeviceStreamStats:
        """The counters, with every timing still in flight read back first."""
        self._clock.settle()
        return self._stats

    @property
    def device_bytes(self) -> int:
        """Bytes of the device buffers held (0 once closed)."""
        return sum(slot.buffer.nbytes for slot in self._slots)

    @property
    def pinned_bytes(self) -> int:
        """Bytes of the pinned host images held (0 once closed)."""
        return sum(image.nbytes for image, _ in self._pinned.values())

    def fetch(self, i: int) -> Any:
        """Layer i on the device: valid for kernels queued before `release(i)`."""
        if not 0 <= i < self._num_layers:
            raise IndexError(f"layer {i} out of range for {self._num_layers} layers")
        if i in self._resident:
            return self._resident[i]
        if self._closed:
            raise ValueError("the device layer stream is closed")
        slot = next((s for s in self._slots if s.layer == i), None)
        if slot is None:  # not prefetched: copy it now into a buffer not wanted next
            wanted = self._upcoming(i)
            slot = next((s for s in self._slots if s.layer not in wanted), self._slots[0])
            self._copy(slot, i)
            self._stats.sync_copies += 1
        if slot.upload is not None:  # a disk layer: its copy is queued once its read is done
            start, pending = time.perf_counter(), not slot.upload.done()
            slot.upload.result()  # re-raises a failed read
            slot.upload = None
            if pending:
                self._add_wait(time.perf_counter() - start)
        copied = slot.copied
        self._clock.time(self._compute, lambda: copied.wait(self._compute), self._add_wait)
        self._current = slot
        self._prefetch_after(i)
        if slot.built is None:
            slot.built = self._build(i, self._layouts[i].unpack(slot.buffer))
        return slot.built

    def release(self, i: int) -> None:
        """Every kernel reading layer i is queued: its buffer may be refilled after them."""
        if self._current is not None and self._current.layer == i:
            self._current.released.record(self._compute)
            self._current = None

    def _upcoming(self, i: int) -> list[int]:
        """The streamed layers after i that the other buffers should hold."""
        wanted, j = [], i
        for _ in range(len(self._slots) - 1):
            j = self._next[j]
            wanted.append(j)
        return wanted

    def _prefetch_after(self, i: int) -> None:
        """Queue copies of the streamed layers after i into every buffer but the current."""
        wanted = self._upcoming(i)
        held = {s.layer for s in self._slots}
        free = [s for s in self._slots if s is not self._current and s.layer not in wanted]
        for j in (j for j in wanted if j not in held):
            self._copy(free.pop(0), j)

    def _copy(self, slot: _Slot, layer: int) -> None:
        """Queue the copy of `layer` into `slot` on the copy stream, after compute is done
        with the slot's previous layer (whose release event is already recorded): from its
        pinned image here, from disk through the uploader thread."""
        layout = self._layouts[layer]
        if slot.upload is not None:  # an upload into this buffer is still due (random access)
            slot.upload.result()
            slot.upload = None
        slot.layer, slot.built = layer, None
        self._stats.copies += 1
        self._stats.bytes_copied += layout.nbytes
        if layer in self._pinned:
            self._queue_copy(slot, self._pinned[layer][0][: layout.nbytes], layout.nbytes)
        else:
            slot.upload = self._uploader.submit(self._upload, slot, layer, layout.nbytes)

    def _upload(self, slot: _Slot, layer: int, nbytes: int) -> None:
        """On the uploader thread: wait for the disk read, copy it in, wait for the copy
        (asking for the next disk layer lets the LayerStream refill this staging buffer)."""
        source = self._disk.read_bytes(layer)
        start = time.perf_counter()
        slot.released.wait(self._copy_stream)
        slot.buffer[:nbytes].copy_to_device(source, stream=self._copy_stream)
        slot.copied.record(self._copy_stream)
        slot.copied.synchronize()
        self._add_copy(time.perf_counter() - start)

    def _queue_copy(self, slot: _Slot, source: np.ndarray, nbytes: int) -> None:
        """Queue a pinned image's copy into `slot` after compute released it, timed by events."""
        slot.released.wait(self._copy_stream)
        target, stream = slot.buffer[:nbytes], self._copy_stream
        self._clock.time(
            stream, lambda: target.copy_to_device(source, stream=stream), self._add_copy
        )
        slot.copied.record(stream)

    def _add_copy(self, seconds: float) -> None:
        with self._stats_lock:
            self._stats.copy_s += seconds

    def _add_wait(self, seconds: float) -> None:
        with self._stats_lock:
            self._stats.wait_s += seconds

    def close(self) -> None:
        """Wait for the copies in flight, then release buffers, images, events and stream."""
        if self._closed:
            return
        self._closed = True
        if self._uploader is not None:
            self._uploader.shutdown(wait=True, cancel_futures=True)
        self._copy_stream.synchronize()
        self._clock.settle()
        self._slots = []
        self._pinned = {}
        self._current = None
        self._copy_stream = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
