"""Where each decoder layer lives, and the LayerSource that serves them to the model.

One module for both devices. The planner (offload.placement) is format-blind; this is where
the checkpoint's tensor names (how a layer becomes bytes and back) meet it:
- CPU: layers that fit the RAM budget stay resident; the rest stream from a lamina
  checkpoint on disk through two host buffers (offload.streaming).
- GPU (a backend with `separate_memory`): the layers that fit the GPU budget move to the
  device once; the others stay in pinned host RAM (or, past the RAM budget, on disk) and are
  copied into device buffers while earlier layers compute (offload.device_stream).

Residency is explicit: the model calls `fetch(i)` and `release(i)` on a LayerSource.
`ModelWeights.layers` stays the plain list the loader made, so reading it (sizes, the bench)
never moves data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, cast

import numpy as np

from engine.errors import LaminaError
from engine.loader.checkpoint import (
    build_layer,
    checkpoint_layer_tensors,
    layer_arrays,
    layer_descriptors,
    open_layer_stream,
)
from engine.loader.model_loader import LoadedModel
from engine.weights import ExpertWeights, LayerWeights, ModelWeights
from offload.placement import (
    ExpertSizes,
    PlacementPlan,
    Tier,
    default_cpu_budget,
    default_gpu_budget,
    plan_placement,
)
from offload.streaming import LayerLayout, LayerStream, TensorSpec

if TYPE_CHECKING:
    from engine.backends import Backend, DeviceBackend
    from engine.engine_config import EngineConfig
    from offload.device_stream import DeviceLayerStream
    from offload.expert_cache import DeviceExpertCache


class LayerSource(Protocol):
    """Decoder layers by explicit residency: a layer fetched is valid until released."""

    def fetch(self, i: int) -> LayerWeights: ...

    def release(self, i: int) -> None: ...


class ResidentLayers:
    """Every layer already in the memory the backend computes in."""

    def __init__(self, layers: list[LayerWeights]) -> None:
        self._layers = layers

    def fetch(self, i: int) -> LayerWeights:
        return self._layers[i]

    def release(self, i: int) -> None:
        """Nothing to do: resident layers stay."""


@dataclass
class Placement:
    """The plan (None: weights already in RAM, no budget to plan), the layer source the
    model reads, and the streams behind it (None when not streaming). `weights`: the
    model's, when some of its layers are views of pinned host images."""

    plan: PlacementPlan | None
    layers: LayerSource
    disk_stream: LayerStream | None = None
    device_stream: DeviceLayerStream | None = None
    pinned_weights: ModelWeights | None = None
    expert_cache: DeviceExpertCache | None = None

    def close(self) -> None:
        """The device stream first: its copies may read the disk stream's buffers. A model
        with layers in pinned images lets go of its layers too, so the page-locked memory
        is returned (a closed engine runs nothing)."""
        if self.device_stream is not None:
            self.device_stream.close()
        if self.expert_cache is not None:
            self.expert_cache.close()
        if self.disk_stream is not None:
            self.disk_stream.close()
        if self.pinned_weights is not None:
            self.pinned_weights.layers = []


@dataclass(frozen=True)
class CacheMemory:
    """What sizes the KV cache: the memory free where it lives (RAM, or GPU memory left
    after the weights), and whether a memory budget applies (then it defaults to one
    context)."""

    free: int
    budgeted: bool
    gpu_budget: int | None = None


def cache_memory(loaded: LoadedModel, backend: Backend, config: EngineConfig) -> CacheMemory:
    """Measured before any weight moves: on a GPU, the weights are placed after the cache
    is sized, within what is left."""
    free = backend.free_memory()
    if not backend.separate_memory:
        return CacheMemory(free, budgeted=config.cpu_memory is not None)
    gpu_budget = default_gpu_budget(free) if config.gpu_memory is None else config.gpu_memory
    weight_bytes = loaded.weights.nbytes
    budgeted = config.cpu_memory is not None or config.gpu_memory is not None
    budgeted = budgeted or weight_bytes > gpu_budget
    return CacheMemory(max(0, free - weight_bytes), budgeted, gpu_budget)


def place_layers(
    loaded: LoadedModel,
    backend: Backend,
    config: EngineConfig,
    memory: CacheMemory,
    reserve_bytes: int,
) -> Placement:
    """Plan and set up where the layers live. reserve_bytes: the KV cache and activations,
    which the budget must also hold."""
    if backend.separate_memory:
        device = cast("DeviceBackend", backend)
        return _place_on_device(loaded, device, config, memory, reserve_bytes)
    backend.prepare_weights(loaded.weights)  # before streaming: it walks every layer
    return _place_in_ram(loaded, config, reserve_bytes)


def _place_in_ram(loaded: LoadedModel, config: EngineConfig, reserve: int) -> Placement:
    """Weights already loaded into RAM without a budget have nothing to plan."""
    folder, weights = loaded.checkpoint, loaded.weights
    resident = ResidentLayers(weights.layers)
    if config.cpu_memory is None and folder is None:
        return Placement(None, resident)
    budget = default_cpu_budget() if config.cpu_memory is None else config.cpu_memory
    tensors = None if folder is None else checkpoint_layer_tensors(folder, len(weights.layers))
    if tensors is None:
        sizes = [layer.nbytes for layer in weights.layers]
    else:  # exactly what a streaming buffer holds (tensors keep their file alignment)
        sizes = [LayerLayout.of(specs).nbytes for specs in tensors]
    non_layer = weights.nbytes - sum(layer.nbytes for layer in weights.layers)
    plan = plan_placement(sizes, non_layer, budget, reserve_bytes=reserve)
    if plan.fully_resident:
        return Placement(plan, resident)
    if tensors is None:
        raise LaminaError(
            f"the model does not fit in the {budget / 2**20:.0f} MiB RAM budget, and only a "
            "lamina checkpoint can stream layers from disk: run `lamina quantize SRC OUT "
            "--weights int8` and load OUT"
        )
    on_disk = plan.layers(Tier.DISK)
    stream = open_layer_stream(
        folder,
        {i: layer for i, layer in enumerate(weights.layers) if i not in on_disk},
        on_disk,
        tensors,
        plan.host_buffers.count,
        config.drop_page_cache,
    )
    return Placement(plan, stream, disk_stream=stream)


def _place_on_device(
    loaded: LoadedModel,
    backend: DeviceBackend,
    config: EngineConfig,
    memory: CacheMemory,
    reserve: int,
) -> Placement:
    """Plan the layers under both budgets, move the resident ones and the non-layer weights
    to the GPU, and stream the others when some do not fit.

    A layer is sized as the streaming buffers hold it: its checkpoint byte ranges (with the
    file's alignment) for a lamina checkpoint, which is also what a disk read fills, else
    its arrays packed on 64-byte boundaries. A mixture of experts that does not fit whole
    is placed without its experts, which stay in host memory behind a device expert cache.
    """
    from offload.device_stream import DeviceLayerStream  # imports numba.cuda
    from offload.expert_cache import DeviceExpertCache

    cpu_budget = default_cpu_budget() if config.cpu_memory is None else config.cpu_memory
    gpu_budget = memory.gpu_budget
    weights, folder = loaded.weights, loaded.checkpoint
    n = len(weights.layers)
    tensors = None if folder is None else checkpoint_layer_tensors(folder, n)
    layouts = _layouts(weights, tensors)
    non_layer = weights.nbytes - sum(layer.nbytes for layer in weights.layers)
    experts = _expert_sizes(weights, tensors)
    plan = plan_placement(
        [layout.nbytes for layout in layouts],
        non_layer,
        cpu_budget,
        gpu_budget=gpu_budget,
        reserve_bytes=reserve,
        experts=experts,
    )
    host_experts: dict[int, ExpertWeights] = {}
    if plan.expert_cache is not None:
        host_experts = {i: lay.experts for i, lay in enumerate(weights.layers) if lay.experts}
        tensors = tensors and [[s for s in specs if not _is_expert(s.name)] for specs in tensors]
        layouts = _layouts(weights, tensors, dense=True)
    on_disk = plan.layers(Tier.DISK)
    if on_disk and tensors is None:
        raise LaminaError(
            f"the model fits neither the {gpu_budget / 2**20:.0f} MiB GPU budget nor, for the "
            f"layers streamed to the GPU, the {cpu_budget / 2**20:.0f} MiB RAM budget, and "
            "only a lamina checkpoint can stream layers from disk: run `lamina quantize SRC "
            "OUT --weights int8` and load OUT, or raise --gpu-memory / --cpu-memory"
        )
    resident = plan.layers(Tier.DEVICE)
    if plan.expert_cache is not None:  # before prepare_weights, which then leaves experts
        cache = plan.expert_cache
        backend.expert_cache = DeviceExpertCache(
            cache.slots, cache.transient, cache.slot_bytes, backend.device_empty, backend.stream
        )
    backend.prepare_weights(weights, resident)
    if plan.fully_resident:
        return Placement(plan, ResidentLayers(weights.layers), expert_cache=backend.expert_cache)
    source = str(folder or loaded.path)
    # What a streamed layer's format says, from the host: reading it from the layer's
    # device buffer would copy it back (a wait) each time the layer is built.
    descriptors = {
        i: layer_descriptors(_layer_arrays(weights.layers[i], i, bool(host_experts)))
        for i in range(n)
        if i not in resident
    }

    def build(i: int, arrays: dict) -> LayerWeights:
        return build_layer({**arrays, **descriptors[i]}, i, source, host_experts.get(i))

    pinned = {}
    for i in plan.layers(Tier.HOST_TO_DEVICE):
        image = backend.pinned_empty(layouts[i].nbytes)
        layouts[i].pack(_layer_arrays(weights.layers[i], i, bool(host_experts)), image)
        pinned[i] = (image, layouts[i])
        # The layer's host copy is now its pinned image: drop the arrays it was packed from.
        weights.layers[i] = build(i, layouts[i].unpack(image))
    disk = None
    if on_disk:
        disk = open_layer_stream(
            folder,
            {},
            on_disk,
            tensors,
            plan.host_buffers.count,
            config.drop_page_cache,
            allocate=backend.pinned_empty,
        )
    try:
        stream = DeviceLayerStream(
            n,
            {i: weights.layers[i] for i in resident},
            pinned,
            disk,
            build,
            backend.stream,
            backend.device_empty,
            buffers=plan.device_buffers.count,
        )
    except BaseException:
        if disk is not None:
            disk.close()
        raise
    weights_in_pinned = weights if pinned else None
    return Placement(plan, stream, disk, stream, weights_in_pinned, backend.expert_cache)


def _is_expert(name: str) -> bool:
    """Whether a checkpoint tensor name is one of a layer's experts (layers.i.experts.*)."""
    return name.split(".", 3)[2] == "experts"


def _layer_arrays(layer: LayerWeights, i: int, dense: bool) -> dict[str, np.ndarray]:
    """Layer i's arrays by checkpoint name; with `dense`, those of its experts left out."""
    arrays = layer_arrays(layer, i)
    return {k: a for k, a in arrays.items() if not _is_expert(k)} if dense else arrays


def _layouts(
    weights: ModelWeights, tensors: list[list[TensorSpec]] | None, dense: bool = False
) -> list[LayerLayout]:
    """How each layer fills a streaming buffer: its checkpoint tensors' byte ranges, or its
    arrays packed (with `dense`, without its experts)."""
    if tensors is not None:
        return [LayerLayout.of(specs) for specs in tensors]
    return [
        LayerLayout.packed(_layer_arrays(lay, i, dense)) for i, lay in enumerate(weights.layers)
    ]


def _expert_sizes(
    weights: ModelWeights, tensors: list[list[TensorSpec]] | None
) -> ExpertSizes | None:
    """A mixture of experts' layers without their experts, and its experts, as their bytes
    in a streaming buffer and an expert cache slot; None for a dense model."""
    if not any(layer.experts for layer in weights.layers):
        return None
    if tensors is not None:
        dense = [LayerLayout.of([s for s in specs if not _is_expert(s.name)]) for specs in tensors]
    else:
        dense = _layouts(weights, None, dense=True)
    sizes = [
        LayerLayout.packed(layer.experts.expert_arrays(e)).nbytes
        for layer in weights.layers
        if layer.experts is not None
        for e in range(layer.experts.count)
    ]
    return ExpertSizes(tuple(layout.nbytes for layout in dense), tuple(sizes))
