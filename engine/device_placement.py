"""Which decoder layers live on the GPU and which are copied in: the engine side of offload.

With the CUDA backend, the layers that fit the GPU budget are moved to the device once; the
others stay in pinned host RAM (or, past the RAM budget, on disk) and are copied into device
buffers layer by layer by offload.device_stream while earlier layers compute. This module
sizes each layer as a streaming buffer holds it, plans, moves the resident part, packs the
pinned images and opens the streams. It is where the checkpoint's tensor names (how a
layer becomes bytes and back) meet the format-blind offload package.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.errors import LaminaError
from engine.loader.checkpoint import (
    build_layer,
    checkpoint_layer_tensors,
    layer_arrays,
    open_layer_stream,
)
from engine.loader.model_loader import LoadedModel
from offload.device_stream import DeviceLayerStream
from offload.placement import PlacementPlan, Tier, plan_placement
from offload.streaming import LayerLayout, LayerStream


@dataclass
class DevicePlacement:
    """The plan, and the streams serving the layers that are not resident (None: none)."""

    plan: PlacementPlan
    device_stream: DeviceLayerStream | None = None
    disk_stream: LayerStream | None = None


def place_on_device(
    loaded: LoadedModel,
    backend: Any,  # a CUDABackend
    cpu_budget: int,
    gpu_budget: int,
    reserve_bytes: int,
    drop_page_cache: bool,
) -> DevicePlacement:
    """Plan the layers under both budgets, move the resident ones and the non-layer weights
    to the GPU, and install a DeviceLayerStream as `loaded.weights.layers` when some layers
    stream. reserve_bytes: the KV cache and activations, which the GPU must also hold.

    A layer is sized as the streaming buffers hold it: its checkpoint byte ranges (with the
    file's alignment) for a lamina checkpoint, which is also what a disk read fills, else
    its arrays packed on 64-byte boundaries.
    """
    weights, folder = loaded.weights, loaded.checkpoint
    n = len(weights.layers)
    tensors = None if folder is None else checkpoint_layer_tensors(folder, n)
    if tensors is None:
        layouts = [LayerLayout.packed(layer_arrays(lay, i)) for i, lay in enumerate(weights.layers)]
    else:
        layouts = [LayerLayout.of(specs) for specs in tensors]
    non_layer = weights.nbytes - sum(layer.nbytes for layer in weights.layers)
    plan = plan_placement(
        [layout.nbytes for layout in layouts],
        non_layer,
        cpu_budget,
        gpu_budget=gpu_budget,
        reserve_bytes=reserve_bytes,
    )
    on_disk = plan.layers(Tier.DISK)
    if on_disk and tensors is None:
        raise LaminaError(
            f"the model fits neither the {gpu_budget / 2**20:.0f} MiB GPU budget nor, for the "
            f"layers streamed to the GPU, the {cpu_budget / 2**20:.0f} MiB RAM budget, and "
            "only a lamina checkpoint can stream layers from disk: run `lamina quantize SRC "
            "OUT --weights int8` and load OUT, or raise --gpu-memory / --cpu-memory"
        )
    resident = plan.layers(Tier.DEVICE)
    backend.prepare_weights(weights, resident)
    if plan.fully_resident:
        return DevicePlacement(plan)
    pinned = {}
    for i in plan.layers(Tier.HOST_TO_DEVICE):
        image = backend.pinned_empty(layouts[i].nbytes)
        layouts[i].pack(layer_arrays(weights.layers[i], i), image)
        pinned[i] = (image, layouts[i])
    disk = None
    if on_disk:
        disk = open_layer_stream(
            folder,
            {},
            on_disk,
            tensors,
            plan.host_buffers.count,
            drop_page_cache,
            allocate=backend.pinned_empty,
        )
    source = str(folder or loaded.path)
    try:
        stream = DeviceLayerStream(
            n,
            {i: weights.layers[i] for i in resident},
            pinned,
            disk,
            lambda i, arrays: build_layer(arrays, i, source),
            backend.stream,
            backend.device_empty,
            buffers=plan.device_buffers.count,
        )
    except BaseException:
        if disk is not None:
            disk.close()
        raise
    weights.layers = stream
    return DevicePlacement(plan, stream, disk)
