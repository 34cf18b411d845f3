"""Where each decoder layer lives: a placement plan over disk -> host RAM -> device.

The plan is pure arithmetic over byte counts, so it can be tested exhaustively and printed
before anything is loaded. Four homes exist for a layer:

    DEVICE          resident in device memory
    HOST            resident in host RAM (computed there when there is no GPU)
    HOST_TO_DEVICE  resident in host RAM (pinned), copied into a device buffer for each use
    DISK            read from the checkpoint file into a host buffer for each use (and, with
                    a GPU, copied on into a device buffer)

Streamed layers pass through a ring of reusable buffers (two: one being computed while the
next is filled), each as large as the largest streamed layer. The non-layer weights
(embedding, output head, final norm) and the reserve (KV cache, activations) stay on the
compute device, since every token touches them.

A mixture of experts that does not fit a GPU whole is placed in two parts, since a token
runs only k of a layer's E experts: the layers without their experts are placed as above
(resident first), and the GPU memory left becomes an expert cache, slots each holding one
expert, kept filled with the most used experts; the experts themselves stay where the loader
put them in host memory (mapped from the file, or in RAM). Streaming whole layers instead
would copy every expert of a streamed layer for each token.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass

import psutil

MiB = 2**20
# Host RAM kept free by the default budget: the interpreter, the tokenizer, numba's compiled
# code and the OS need room that no model byte count includes.
HOST_MARGIN_MIN = 256 * MiB
HOST_MARGIN_SHARE = 0.10
# Device memory kept free by the default budget: the CUDA context, kernel scratch and
# allocator fragmentation (llama.cpp's automatic layer fitting keeps about 1 GiB).
DEVICE_MARGIN_MIN = 512 * MiB
DEVICE_MARGIN_SHARE = 0.05

_UNITS = {"K": 2**10, "M": MiB, "G": 2**30, "T": 2**40}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:([KMGT])(?:I?B)?|(B))?\s*$", re.IGNORECASE)


class PlacementError(ValueError):
    """The budgets cannot hold the model even with streaming (a user-fixable setting)."""


class Tier(enum.Enum):
    DEVICE = "device"
    HOST = "host"
    HOST_TO_DEVICE = "host->device"
    DISK = "disk"

    @property
    def streamed(self) -> bool:
        return self in (Tier.HOST_TO_DEVICE, Tier.DISK)


@dataclass(frozen=True)
class Buffers:
    """`count` reusable streaming buffers of `nbytes` each."""

    count: int = 0
    nbytes: int = 0

    @property
    def total(self) -> int:
        return self.count * self.nbytes


@dataclass(frozen=True)
class ExpertSizes:
    """A mixture of experts' layers in two parts: each layer without its experts (`dense`),
    and the bytes of every expert of the model (`experts`, all layers together)."""

    dense: tuple[int, ...]
    experts: tuple[int, ...]


@dataclass(frozen=True)
class ExpertCachePlan:
    """Device slots for experts, each as large as the largest expert: `slots` keep the most
    used experts resident; `transient` slots serve, one use at a time, an expert used too
    seldom to displace one of them (none when every expert has a slot)."""

    slots: int
    transient: int
    slot_bytes: int
    experts: int  # experts in the model

    @property
    def total(self) -> int:
        return (self.slots + self.transient) * self.slot_bytes


@dataclass(frozen=True)
class Charge:
    """What a plan puts on one memory budget, by purpose."""

    budget: int
    non_layer: int = 0
    reserve: int = 0
    resident_layers: int = 0
    buffers: int = 0
    expert_cache: int = 0

    @property
    def used(self) -> int:
        return (
            self.non_layer + self.reserve + self.resident_layers + self.buffers + self.expert_cache
        )


@dataclass(frozen=True)
class PlacementPlan:
    tiers: tuple[Tier, ...]
    layer_bytes: tuple[int, ...]
    host_buffers: Buffers
    device_buffers: Buffers
    cpu: Charge
    gpu: Charge | None  # None when there is no GPU
    # Set when a mixture of experts is placed in two parts: layer_bytes then count the
    # layers without their experts, which live in host memory and in this cache.
    expert_cache: ExpertCachePlan | None = None

    def layers(self, tier: Tier) -> list[int]:
        return [i for i, t in enumerate(self.tiers) if t is tier]

    @property
    def fully_resident(self) -> bool:
        return not any(t.streamed for t in self.tiers)

    def describe(self) -> str:
        """A few human-readable lines: where the layers live, and each budget's use."""
        n = len(self.tiers)
        homes = {
            Tier.DEVICE: "resident on the device",
            Tier.HOST: "resident in host RAM",
            Tier.HOST_TO_DEVICE: "streamed host -> device",
            Tier.DISK: "streamed from disk",
        }
        parts = []
        for tier, words in homes.items():
            found = self.layers(tier)
            if found:
                parts.append(f"{len(found)} {words} ({_ranges(found)})")
        lines = [f"placement of {n} layers: " + "; ".join(parts)]
        cache = self.expert_cache
        if cache is not None:
            lines[0] += " (without their experts)"
            lines.append(
                f"  experts in host memory, {cache.slots} of {cache.experts} kept on the device"
                f" by use, + {cache.transient} transient: {cache.slots + cache.transient} slots"
                f" x {_mib(cache.slot_bytes)}"
            )
        for name, buffers in (("host", self.host_buffers), ("device", self.device_buffers)):
            if buffers.count:
                lines.append(
                    f"  {name} streaming buffers: {buffers.count} x {_mib(buffers.nbytes)}"
                )
        for name, charge in (("cpu", self.cpu), ("gpu", self.gpu)):
            if charge is not None:
                lines.append(
                    f"  {name} budget {_mib(charge.budget)}: used {_mib(charge.used)} = "
                    f"non-layer weights {_mib(charge.non_layer)} + reserve {_mib(charge.reserve)}"
                    f" + resident layers {_mib(charge.resident_layers)}"
                    f" + buffers {_mib(charge.buffers)}"
                    + (
                        f" + expert cache {_mib(charge.expert_cache)}"
                        if charge.expert_cache
                        else ""
                    )
                )
        return "\n".join(lines)


def plan_placement(
    layer_bytes: Sequence[int],
    non_layer_bytes: int,
    cpu_budget: int,
    *,
    gpu_budget: int | None = None,
    reserve_bytes: int = 0,
    buffer_slots: int = 2,
    experts: ExpertSizes | None = None,
) -> PlacementPlan:
    """Place every layer under the budgets, keeping as many resident as fit.

    Without a GPU (gpu_budget None) the CPU computes: non-layer weights, reserve, resident
    layers and disk buffers share cpu_budget. With a GPU, non-layer weights and reserve go on
    the device; the device keeps what it can and streams the rest through device buffers,
    and those layers are kept in host RAM as far as cpu_budget allows, else read from disk
    through host staging buffers.

    Resident layers are always the earliest ones, a prefix. A contiguous tail streams in
    order, so reads are sequential in the checkpoint, and the first streamed layer of the
    next forward pass is prefetched while the resident prefix (plus the output head,
    sampling and the embedding) computes, which hides the one read that would otherwise
    wait. Among prefixes the longest that fits wins: decoder layers have nearly equal sizes,
    so this also keeps the largest number of layers resident.

    `experts` (a mixture of experts, with a GPU): when the whole layers do not all fit the
    GPU, the layers are placed without their experts, and the GPU memory left over becomes
    the expert cache (`expert_cache_plan`).

    Raises PlacementError when even streaming cannot fit: a budget smaller than its fixed
    charges plus the cheapest split into resident layers and buffers (`least_bytes`).
    """
    sizes = tuple(int(b) for b in layer_bytes)
    if any(b < 0 for b in sizes) or non_layer_bytes < 0 or reserve_bytes < 0:
        raise ValueError("byte counts must not be negative")
    if buffer_slots < 1:
        raise ValueError(f"buffer_slots must be at least 1, got {buffer_slots}")
    n = len(sizes)
    if gpu_budget is None:
        room = cpu_budget - non_layer_bytes - reserve_bytes
        k = _longest_prefix(sizes, 0, room, buffer_slots)
        if k is None:
            raise PlacementError(
                _too_small("cpu", cpu_budget, non_layer_bytes + reserve_bytes, sizes, buffer_slots)
            )
        host = _buffers(sizes, k, buffer_slots)
        return PlacementPlan(
            tiers=(Tier.HOST,) * k + (Tier.DISK,) * (n - k),
            layer_bytes=sizes,
            host_buffers=host,
            device_buffers=Buffers(),
            cpu=Charge(cpu_budget, non_layer_bytes, reserve_bytes, sum(sizes[:k]), host.total),
            gpu=None,
        )
    fixed = (non_layer_bytes, cpu_budget, gpu_budget, reserve_bytes, buffer_slots)
    if experts is None or not experts.experts:
        return _plan_on_gpu(sizes, *fixed)
    try:
        whole = _plan_on_gpu(sizes, *fixed)
        if whole.fully_resident:
            return whole
    except PlacementError:
        pass
    return expert_cache_plan(experts, *fixed)


def expert_cache_plan(
    experts: ExpertSizes,
    non_layer_bytes: int,
    cpu_budget: int,
    gpu_budget: int,
    reserve_bytes: int = 0,
    buffer_slots: int = 2,
) -> PlacementPlan:
    """Place a mixture of experts' layers without their experts, with one transient expert
    slot held back, then give every whole slot the GPU budget has left to the cache: one
    per expert at most (and then no transient slot)."""
    dense = tuple(int(b) for b in experts.dense)
    slot = max(experts.experts)
    count = len(experts.experts)
    plan = _plan_on_gpu(dense, non_layer_bytes, cpu_budget, gpu_budget, reserve_bytes + slot,
                        buffer_slots)  # fmt: skip
    assert plan.gpu is not None
    left = gpu_budget - plan.gpu.used + slot
    resident, transient = (count, 0) if left >= count * slot else (left // slot - 1, 1)
    cache = ExpertCachePlan(resident, transient, slot, count)
    gpu = dataclasses.replace(plan.gpu, reserve=reserve_bytes, expert_cache=cache.total)
    return dataclasses.replace(plan, gpu=gpu, expert_cache=cache)


def _plan_on_gpu(
    sizes: tuple[int, ...],
    non_layer_bytes: int,
    cpu_budget: int,
    gpu_budget: int,
    reserve_bytes: int,
    buffer_slots: int,
) -> PlacementPlan:
    n = len(sizes)
    room = gpu_budget - non_layer_bytes - reserve_bytes
    d = _longest_prefix(sizes, 0, room, buffer_slots)
    if d is None:
        raise PlacementError(
            _too_small("gpu", gpu_budget, non_layer_bytes + reserve_bytes, sizes, buffer_slots)
        )
    h = _longest_prefix(sizes, d, cpu_budget, buffer_slots)
    if h is None:
        raise PlacementError(_too_small("cpu", cpu_budget, 0, sizes[d:], buffer_slots))
    device = _buffers(sizes, d, buffer_slots)
    host = _buffers(sizes, h, buffer_slots)
    return PlacementPlan(
        tiers=(Tier.DEVICE,) * d + (Tier.HOST_TO_DEVICE,) * (h - d) + (Tier.DISK,) * (n - h),
        layer_bytes=sizes,
        host_buffers=host,
        device_buffers=device,
        cpu=Charge(cpu_budget, resident_layers=sum(sizes[d:h]), buffers=host.total),
        gpu=Charge(gpu_budget, non_layer_bytes, reserve_bytes, sum(sizes[:d]), device.total),
    )


def _buffers(sizes: tuple[int, ...], start: int, slots: int) -> Buffers:
    """Buffers for streaming layers start.. : at most one per streamed layer."""
    tail = sizes[start:]
    if not tail:
        return Buffers()
    return Buffers(min(slots, len(tail)), max(tail))


def _longest_prefix(sizes: tuple[int, ...], first: int, room: int, slots: int) -> int | None:
    """The largest k >= first such that layers first..k-1 resident plus buffers for k.. fit
    in `room` bytes; None when none does."""
    n = len(sizes)
    tail_max = [0] * (n + 1)
    for i in range(n - 1, first - 1, -1):
        tail_max[i] = max(tail_max[i + 1], sizes[i])
    resident = sum(sizes[first:])
    for k in range(n, first - 1, -1):
        if k < n:
            resident -= sizes[k]
        buffers = min(slots, n - k) * tail_max[k]
        if resident + buffers <= room:
            return k
    return None


def least_bytes(layer_bytes: Sequence[int], buffer_slots: int = 2) -> int:
    """The fewest bytes that hold these layers, resident or streamed (over every split)."""
    sizes = tuple(layer_bytes)
    return min(
        sum(sizes[:k]) + min(buffer_slots, len(sizes) - k) * max(sizes[k:], default=0)
        for k in range(len(sizes) + 1)
    )


def _too_small(name: str, budget: int, fixed: int, sizes: Sequence[int], slots: int) -> str:
    need = fixed + least_bytes(sizes, slots)
    return (
        f"the {name} memory budget of {_mib(budget)} cannot hold the model even when streaming "
        f"layers through {slots} buffers: it needs at least {_mib(need)}, of which "
        f"{_mib(fixed)} are non-layer weights and the reserve for the KV cache and activations;"
        " raise the budget, or shrink the KV cache (--kv-cache-mb, --max-model-len)"
    )


def default_cpu_budget(available: int | None = None) -> int:
    """Host RAM the model may use by default: what psutil reports available, less a margin
    (10%, at least 256 MiB) for the interpreter, tokenizer, compiled code and the OS."""
    free = psutil.virtual_memory().available if available is None else available
    return max(0, free - max(HOST_MARGIN_MIN, int(free * HOST_MARGIN_SHARE)))


def default_gpu_budget(free_bytes: int) -> int:
    """Device memory the model may use by default, given the driver's free bytes: less a
    margin (5%, at least 512 MiB) for the CUDA context, kernel scratch and fragmentation."""
    return max(0, free_bytes - max(DEVICE_MARGIN_MIN, int(free_bytes * DEVICE_MARGIN_SHARE)))


def parse_memory_size(text: str) -> int:
    """Bytes in a size such as "512", "512M", "1.5G", "2GiB", "300MB" or "4096B".

    A bare number means MiB, like --kv-cache-mb; units are binary (K = 1024 bytes).
    """
    m = _SIZE_RE.match(text)
    if m is None:
        raise ValueError(f"not a memory size: {text!r} (examples: 512, 512M, 1.5G)")
    number, unit, plain_bytes = m.groups()
    scale = 1 if plain_bytes else _UNITS[unit.upper()] if unit else MiB
    value = float(number) * scale
    if value < 1:
        raise ValueError(f"a memory size must be positive, got {text!r}")
    return int(value)


def _mib(n: int) -> str:
    return f"{n / MiB:.1f} MiB"


def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    out = []
    start = prev = indices[0]
    for i in [*indices[1:], None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ", ".join(out)
