"""The experts of a mixture of experts kept on the device by use: a cache of device slots.

A token runs k of a layer's E experts, and which ones is known only once the router has run.
When a mixture of experts does not fit the GPU whole, its experts stay in host memory and
this cache holds as many of them on the device as the placement plan gave slots for. Most
models route unevenly (some experts are picked far more often than others), so keeping the
most used ones resident serves most picks without a copy; llama.cpp's `--n-cpu-moe` makes
the opposite choice by layer, keeping whole layers' experts on the CPU.

Policy: every fetch counts a use of its expert; counts halve every `decay_period` fetches, so
the cache follows a workload whose hot experts change. A missed expert takes a free slot,
else the slot of the least used resident expert if it has been used more, else a transient
slot (refilled by the next such expert), so a rarely used expert never evicts a hot one. An
expert found in a transient slot that has come to outrank the least used resident one
moves into its slot (a device-to-device copy).

Copies are queued on the compute stream, so a slot is refilled only after the kernels
queued before the copy, which read its previous expert: the stream orders reuse without
events. The copy of a missed expert therefore does not overlap compute; misses are meant
to be rare. The host arrays are copied as they are (pageable memory, often a mapped file).

This module moves bytes: the caller passes each expert's host arrays, an object whose
identity names the expert (kept alive here while it has a count), and a `build` function
turning {name: device array} into what the caller computes with.

Verified under numba's CUDA simulator only, as offload.device_stream is.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from offload.streaming import LayerLayout

DeviceArray = Any  # numba's DeviceNDArray (the simulator's fake in tests): no type stubs


@dataclass
class ExpertCacheStats:
    """Counters of a DeviceExpertCache: fetches served from a slot (hits) or copied in
    (misses, of which `admitted` took a resident slot), and the bytes copied."""

    hits: int = 0
    misses: int = 0
    admitted: int = 0
    bytes_copied: int = 0

    @property
    def hit_rate(self) -> float:
        fetches = self.hits + self.misses
        return self.hits / fetches if fetches else 0.0

    def describe(self) -> str:
        return (
            f"expert cache: {self.hits} hits, {self.misses} misses ({self.hit_rate:.0%} hit "
            f"rate), {self.admitted} experts admitted, {self.bytes_copied / 1e6:.1f} MB copied "
            "host -> device"
        )


@dataclass
class _Slot:
    buffer: DeviceArray
    resident: bool  # False: a transient slot
    owner: Any = None  # the expert it holds
    layout: LayerLayout | None = None  # where its arrays lie in the buffer
    build: Callable | None = None  # the caller's, for its arrays
    built: Any = None  # build() over its buffer


class DeviceExpertCache:
    """`slots` resident and `transient` device slots of `slot_bytes` each (from
    `device_empty`), filled on `stream` (the one the experts' kernels run on)."""

    def __init__(
        self,
        slots: int,
        transient: int,
        slot_bytes: int,
        device_empty: Callable[[int], DeviceArray],
        stream: Any,
        *,
        decay_period: int | None = None,
    ) -> None:
        if slots < 0 or transient < 0 or slots + transient < 1:
            raise ValueError(f"an expert cache needs a slot, got {slots} + {transient}")
        self._slots = [_Slot(device_empty(slot_bytes), k < slots) for k in range(slots + transient)]
        self._slot_bytes = slot_bytes
        self._stream = stream
        self._decay_period = decay_period or 16 * len(self._slots)
        self._fetches = 0
        self._uses: dict[int, list] = {}  # id(owner) -> [owner, uses]
        self._where: dict[int, _Slot] = {}  # id(owner) -> its slot
        self._next_transient = 0
        self.stats = ExpertCacheStats()

    @property
    def device_bytes(self) -> int:
        """Bytes of the device slots held (0 once closed)."""
        return len(self._slots) * self._slot_bytes

    def holds(self, owner: object) -> bool:
        """Whether `owner`'s expert is in a resident slot now."""
        slot = self._where.get(id(owner))
        return slot is not None and slot.resident

    def fetch(
        self,
        owner: object,
        arrays: Mapping[str, np.ndarray],
        build: Callable[[dict[str, DeviceArray]], Any],
    ) -> Any:
        """`build` over device copies of `arrays`, the expert named by `owner`: valid for
        kernels queued on the stream before the next fetch."""
        if not self._slots:
            raise ValueError("the expert cache is closed")
        uses = self._count(owner)
        slot = self._where.get(id(owner))
        if slot is not None:
            self.stats.hits += 1
            if not slot.resident and (target := self._resident_for(uses)) is not None:
                # Now among the most used: move it to a resident slot, on the device.
                self._fill(target, owner, slot.layout, slot.build, source=slot.buffer)
                slot.owner = slot.built = None
                return target.built
            return slot.built
        layout = LayerLayout.packed(arrays)
        if layout.nbytes > self._slot_bytes:
            raise ValueError(f"an expert of {layout.nbytes} bytes exceeds the cache's slots")
        target = self._resident_for(uses) or self._next_transient_slot()
        self._fill(target, owner, layout, build, arrays=arrays)
        self.stats.misses += 1
        self.stats.bytes_copied += sum(a.nbytes for a in arrays.values())
        return target.built

    def _fill(
        self,
        slot: _Slot,
        owner: object,
        layout: LayerLayout,
        build: Callable,
        *,
        arrays: Mapping[str, np.ndarray] | None = None,
        source: Any = None,
    ) -> None:
        """Queue the copy of an expert into `slot`: from its host `arrays`, or from the
        device buffer `source` (a transient slot's); the slot's previous expert leaves."""
        if slot.owner is not None:
            del self._where[id(slot.owner)]
        if source is not None:
            slot.buffer[: layout.nbytes].copy_to_device(
                source[: layout.nbytes], stream=self._stream
            )
        else:
            for name, where, _, _ in layout.views:
                host = np.ascontiguousarray(arrays[name]).reshape(-1).view(np.uint8)
                slot.buffer[where].copy_to_device(host, stream=self._stream)
        slot.owner, slot.layout, slot.build = owner, layout, build
        slot.built = build(layout.unpack(slot.buffer))
        self._where[id(owner)] = slot
        self.stats.admitted += slot.resident

    def _count(self, owner: object) -> float:
        self._fetches += 1
        if self._fetches % self._decay_period == 0:
            for entry in self._uses.values():
                entry[1] /= 2
        entry = self._uses.setdefault(id(owner), [owner, 0.0])
        entry[1] += 1
        return entry[1]

    def _resident_for(self, uses: float) -> _Slot | None:
        """The resident slot for an expert used `uses` times: a free one, else the least
        used expert's if `uses` is more (or if there are no transient slots); else None."""
        resident = [s for s in self._slots if s.resident]
        free = next((s for s in resident if s.owner is None), None)
        if free is not None or not resident:
            return free
        coldest = min(resident, key=lambda s: self._uses[id(s.owner)][1])
        if uses > self._uses[id(coldest.owner)][1] or len(resident) == len(self._slots):
            return coldest
        return None

    def _next_transient_slot(self) -> _Slot:
        transient = [s for s in self._slots if not s.resident]
        slot = transient[self._next_transient % len(transient)]
        self._next_transient += 1
        return slot

    def close(self) -> None:
        """Release the device slots."""
        self._slots = []
        self._where.clear()
        self._uses.clear()
