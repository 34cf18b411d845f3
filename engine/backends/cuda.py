"""CUDA Backend: the CPU backend's interface over the numba.cuda kernels of kernels_gpu.

Everything a forward pass touches lives on the GPU: the weights (moved once by
`prepare_weights`, or, for layers that do not fit the GPU budget, copied into streaming
buffers by offload.device_stream on a second stream), the paged KV cache (`allocate_kv`),
the activations between calls, and the pass's small integer arrays (token ids, positions,
slots, block tables...), which are uploaded once per pass however many layers read them,
through page-locked staging into device buffers kept from pass to pass. After the first
steps a decode step allocates nothing (`tests/test_cuda_backend.py` counts the calls).
Kernels are queued on one stream and nothing comes back to the host except the logits
(`to_numpy`, the one wait of a dense model's step) and, once per mixture-of-experts layer,
its router's logits (`moe_add_`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

import numpy as np
import psutil
from numba import cuda

import kernels_gpu
from engine.backends.cpu import Scratch
from engine.errors import LaminaError
from engine.kv_cache import ForwardBatch
from engine.weights import (
    LAYER_NORMS,
    BlockWeight,
    ColskipBlockWeight,
    ColskipInt8Weight,
    DenseWeight,
    ExpertWeights,
    Int8Weight,
    ModelWeights,
    SparseInt8Weight,
    StackedWeight,
    Weight,
)
from kernels_cpu.moe import group_by_expert_into, route_top_k_into
from kernels_gpu import activations, elementwise, embedding, moe, norms, rope
from kernels_gpu.matmul_blocks import activation_shapes, block_rows, gemm_blocks, padded_inputs
from kernels_gpu.matmul_f32 import matmul_f32
from kernels_gpu.matmul_int8 import gemm_w8
from kernels_gpu.norms import GATED, PLAIN, RMSNORM
from kernels_gpu.paged_attention import (
    attention_splits,
    paged_attention,
    paged_attention_int8,
    partials_shapes,
    write_kv_int8,
)

if TYPE_CHECKING:
    from offload.expert_cache import DeviceExpertCache

# A numba DeviceNDArray (the simulator's FakeCUDAArray in tests): numba ships no type stubs.
DeviceArray = Any
# Activations are quantised to int16 as on the CPU, so int8 linears give the CPU's bits.
INT16_MAX = 32767
# The most page-locked memory the logits are read into: a step's rows (64 of a 152k
# vocabulary take 39 MiB); a whole prompt's logits (scoring) go to ordinary memory instead
# of pinning gigabytes for the backend's lifetime.
PINNED_READBACK_BYTES = 64 * 2**20
# Weight formats with no CUDA kernel yet, by how users know them.
_NO_KERNEL = {
    SparseInt8Weight: "sparse int8 (bitmask, from `lamina quantize --sparsity`)",
    ColskipInt8Weight: "activation-sparse int8 (from `lamina quantize --activation-sparsity`)",
    ColskipBlockWeight: "activation-sparse int4 (from `lamina quantize --weights int4 "
    "--activation-sparsity`)",
}
# The formats with kernels (a StackedWeight's parts must be of them too).
_RUNNABLE = (DenseWeight, Int8Weight, BlockWeight)
# Scratch names of the block kernels' quantised activations (matmul_blocks.activation_shapes).
_BLOCK_SCRATCH = ("block_xq", "block_xsum", "block_xs", "block_xm")

# The gated activations of `glu`, by name (as the CPU backend's).
_GATES = {"silu": activations.silu_mul, "gelu_tanh": activations.gelu_tanh_mul}


class _Uploads:
    """A forward pass's small host arrays (token ids, positions, slots, block tables...) on
    the device, each uploaded once per pass however many layers read it.

    Each use (a name, and its n-th distinct array in the pass) owns a page-locked staging
    buffer and a device buffer, kept from pass to pass and grown only when a pass needs more;
    the host array is copied into the staging buffer and from there asynchronously on the
    stream. So a warm decode step allocates nothing and does not wait for the copies. A
    staging buffer is rewritten only by a later pass, after the previous one's logits were
    read (which waits for every queued copy).
    """

    def __init__(self, stream: Any) -> None:  # a numba Stream
        self._stream = stream
        self._buffers: dict[tuple[str, int], tuple[np.ndarray, DeviceArray]] = {}
        # This pass: host array id -> (the array, kept alive so its id stays unique; its copy)
        self._copies: dict[int, tuple[np.ndarray, DeviceArray]] = {}
        self._uses: dict[str, int] = {}
        self._pending = False  # copies queued since the last wait

    def get(self, host: np.ndarray, name: str) -> DeviceArray:
        entry = self._copies.get(id(host))
        if entry is not None:
            return entry[1]
        flat = np.ascontiguousarray(host).reshape(-1)
        use = self._uses.get(name, 0)
        self._uses[name] = use + 1
        staging, device = self._buffers.get((name, use), (None, None))
        if device is None or device.size < flat.size or device.dtype != flat.dtype:
            size = max(flat.size, 2 * (0 if device is None else device.size), 64)
            staging = cuda.pinned_array(size, dtype=flat.dtype)
            device = cuda.device_array(size, dtype=flat.dtype, stream=self._stream)
            self._buffers[(name, use)] = (staging, device)
        staging[: flat.size] = flat
        copy = device[: flat.size]
        copy.copy_to_device(staging[: flat.size], stream=self._stream)
        self._pending = True
        copy = copy.reshape(host.shape)
        self._copies[id(host)] = (host, copy)
        return copy

    def settled(self) -> None:
        """The stream was waited for: every queued copy is done."""
        self._pending = False

    def clear(self) -> None:
        """Start a pass (after waiting for a failed one's copies, whose staging it reuses)."""
        if self._pending:
            self._stream.synchronize()
            self._pending = False
        self._copies.clear()
        self._uses.clear()


class CUDABackend:
    """Runs the model on one CUDA GPU (or numba's CUDA simulator, for tests).

    Int8 linears use the GPU twin of the CPU's int8 GEMM (int16 activations, exact integer
    sums), so int8 models give the CPU's logits bit for bit up to attention, norms and
    activations, whose float rounding differs slightly between the devices. Block formats
    (int4, GGUF types) run kernels_gpu.matmul_blocks on the CPU's layout and arithmetic, its
    float sums in another order.
    """

    name = "cuda"
    # Computes in device memory: weights are placed there under the GPU budget.
    separate_memory = True
    expert_bytes_read = 0  # see Backend; counted per instance from the first MoE layer on

    def __init__(self) -> None:
        if not kernels_gpu.available():
            raise LaminaError("numba finds no usable CUDA GPU")
        self.stream = cuda.stream()
        # None under the simulator: one attention block per (token, kv head) is correct
        # everywhere, and splitting keys over more blocks only pays on real SMs.
        self._sm_count = (
            None if kernels_gpu.simulated() else cuda.get_current_device().MULTIPROCESSOR_COUNT
        )
        self._pass = _Uploads(self.stream)  # this forward pass's batch arrays
        # Bytes of the long-lived device arrays allocated so far (weights, KV cache,
        # streaming buffers, activation workspace and kernel scratch); never decreases.
        self.allocated_bytes = 0
        # Kernels' working arrays (quantised activations, attention partials, v), reused.
        self.scratch = Scratch(self._scratch_empty)
        # Host working arrays: the routing of mixture-of-experts layers.
        self.host_scratch = Scratch()
        # Page-locked host memory the logits are read into (the DMA engine writes it
        # directly; pageable memory would be staged through a driver buffer).
        self._readback = Scratch(lambda size, dtype: cuda.pinned_array(size, dtype=dtype))
        # Serves experts left in host memory (a mixture of experts larger than the GPU
        # budget); the placement sets it up.
        self.expert_cache: DeviceExpertCache | None = None

    def prepare_weights(self, weights: ModelWeights, layers: Collection[int] | None = None) -> None:
        """Move the non-layer weights and decoder `layers` (default: all) to the GPU once,
        in place; the other layers stay in host memory for a device stream to copy in. When
        an `expert_cache` is set, experts stay in host memory too, for it to serve.

        The typed weights stay what they are (an Int8Weight is still an Int8Weight); only
        their arrays become device arrays. So the model, and anything else that walks
        `weights`, sees the same structure on both devices, `linear` dispatches on the type
        as the CPU backend does, and the host copies are released instead of being held
        twice. A weight shared by two fields (tied embedding and output head) is moved once.
        Every layer's formats (experts' included) are checked, moved or not, so a format
        without a kernel is refused here rather than halfway through a streamed pass.
        """
        for layer in weights.layers:
            for _, weight in layer.linears():
                _check_kernel(weight)
        moved: dict[int, Weight] = {}

        def move(weight: Weight) -> Weight:
            if id(weight) not in moved:
                moved[id(weight)] = self._to_device_weight(weight)
            return moved[id(weight)]

        weights.embed = move(weights.embed)
        weights.lm_head = move(weights.lm_head)
        weights.final_norm = self._to_device(weights.final_norm)
        chosen = range(len(weights.layers)) if layers is None else layers
        for layer in (weights.layers[i] for i in chosen):
            for name in LAYER_NORMS:
                if getattr(layer, name) is not None:
                    setattr(layer, name, self._to_device(getattr(layer, name)))
            for name, weight in layer.linears():
                if not (self.expert_cache is not None and name.startswith("experts.")):
                    layer.set_linear(name, move(weight))
            if layer.experts is not None:
                layer.experts.router = move(layer.experts.router)
        self.stream.synchronize()

    def _to_device(self, host: np.ndarray) -> DeviceArray:
        if not isinstance(host, np.ndarray):  # already on the device (a self-draft's weights)
            return host
        self.allocated_bytes += host.nbytes
        return cuda.to_device(np.ascontiguousarray(host), stream=self.stream)

    def _to_device_weight(self, weight: Weight) -> Weight:
        """The same weight over device copies of its arrays (a stacked one's parts each)."""
        _check_kernel(weight)
        if not _in_host_memory(weight):  # moved already
            return weight
        if isinstance(weight, StackedWeight):
            parts = [self._to_device_weight(part) for part in weight.parts]
            bias = None if weight.bias is None else self._to_device(weight.bias)
            return StackedWeight(parts, bias)
        arrays = {
            field.name: self._to_device(value)
            for field in dataclasses.fields(weight)
            if isinstance(value := getattr(weight, field.name), np.ndarray)
        }
        return dataclasses.replace(weight, **arrays)

    def device_empty(self, nbytes: int) -> DeviceArray:
        """Uninitialised device bytes: a streaming buffer for layers copied in."""
        self.allocated_bytes += nbytes
        return cuda.device_array(nbytes, dtype=np.uint8, stream=self.stream)

    def pinned_empty(self, nbytes: int) -> np.ndarray:
        """Uninitialised page-locked host bytes, which the GPU copies from asynchronously and
        at full bandwidth (pageable memory is staged through a driver buffer first)."""
        return cuda.pinned_array(nbytes, dtype=np.uint8)

    def empty(self, shape: tuple[int, ...], dtype: str = "float32") -> DeviceArray:
        """An uninitialised activation buffer on the device (the runner's workspace)."""
        array = cuda.device_array(shape, dtype=np.dtype(dtype), stream=self.stream)
        self.allocated_bytes += array.nbytes
        return array

    def _scratch_empty(self, size: int, dtype: type) -> DeviceArray:
        array = cuda.device_array(size, dtype=dtype, stream=self.stream)
        self.allocated_bytes += array.nbytes
        return array

    def embed(
        self, table: Weight, token_ids: np.ndarray, *, out: DeviceArray | None = None
    ) -> DeviceArray:
        """Rows of the embedding table. model.forward calls this first in every pass, so it
        also drops the previous pass's uploaded batch arrays."""
        self._pass.clear()
        ids = self._pass.get(token_ids, "token_ids")
        if isinstance(table, Int8Weight):
            return embedding.embed_rows_w8(table.data, table.scale, ids, out, self.stream)
        if isinstance(table, DenseWeight):
            return embedding.gather_rows(table.data, ids, out, self.stream)
        if isinstance(table, BlockWeight):
            return block_rows(table.kernel_arrays, table.in_features, ids, out, self.stream)
        raise TypeError(f"CUDABackend cannot embed with {type(table).__name__}")

    def linear(
        self, x: DeviceArray, weight: Weight, *, out: DeviceArray | None = None
    ) -> DeviceArray:
        return self._linear(x, weight, out)

    def _linear(
        self,
        x: DeviceArray,
        weight: Weight,
        out: DeviceArray | None,
        accumulate: bool = False,
        prologue: int = PLAIN,
        norm: DeviceArray | None = None,
        eps: float = 0.0,
    ) -> DeviceArray:
        """The linear of rmsnorm(x) (`prologue` RMSNORM), silu(gate) * up (GATED) or x, bias
        included, stored into `out` or added into it (`accumulate`). An int8 weight does all
        of it in two launches (the prologue inside the activations' quantisation, the rest
        in the matmul's epilogue). The fused ops call it too (not through `linear`, which the
        bench's kernel timer wraps: their time would count twice)."""
        if not isinstance(weight, (*_RUNNABLE, StackedWeight)):
            raise TypeError(f"CUDABackend has no kernel for {type(weight).__name__}")
        if _in_host_memory(weight):
            raise LaminaError(
                "the CUDA backend was handed a weight in host memory: weights reach the GPU "
                "through prepare_weights, or a device layer stream's buffers"
            )
        s, take = self.stream, self.scratch.take
        tokens = x.shape[0]
        if isinstance(weight, Int8Weight):
            k = weight.in_features
            act = (take("act", (tokens, k), np.int16), take("act_scale", (tokens,), np.float32))
            return gemm_w8(x, weight.data, weight.scale, INT16_MAX, out, s, act, weight.bias,
                           accumulate, prologue, norm, eps)  # fmt: skip
        if isinstance(weight, BlockWeight):
            shapes = activation_shapes(tokens, padded_inputs(weight.scale, weight.group))
            act = tuple(take(name, *shape) for name, shape in zip(_BLOCK_SCRATCH, shapes))
            return gemm_blocks(x, weight.kernel_arrays, weight.in_features, weight.out_features, out,
                               s, act, weight.bias, accumulate, prologue, norm, eps)  # fmt: skip
        if prologue == RMSNORM:
            x = norms.rmsnorm(x, norm, eps, take("h", x.shape, np.float32), s)
        elif prologue == GATED:
            x = activations.silu_mul(x, take("h", (x.shape[0], x.shape[1] // 2), np.float32), s)
        if isinstance(weight, StackedWeight):
            return self._linear_stacked(x, weight, out, accumulate)
        return matmul_f32(x, weight.data, out, s, weight.bias, accumulate)

    def _linear_stacked(
        self, x: DeviceArray, weight: StackedWeight, out: DeviceArray | None, accumulate: bool
    ) -> DeviceArray:
        """Parts in different formats (a Q4_K_M file's Q4_K q and Q6_K v): each into its own
        columns of `out`, with its share of the bias; x is the input, prologue done."""
        if out is None:  # a new array, as every kernel makes one (the model passes `out`)
            shape = (x.shape[0], weight.out_features)
            out = cuda.device_array(shape, np.float32, stream=self.stream)
        start = 0
        for part in weight.parts:
            end = start + part.out_features
            if weight.bias is not None:
                part = dataclasses.replace(part, bias=weight.bias[start:end])
            self._linear(x, part, out[:, start:end], accumulate)
            start = end
        return out

    def norm_linear(
        self,
        x: DeviceArray,
        norm: DeviceArray,
        eps: float,
        weight: Weight,
        *,
        out: DeviceArray | None = None,
    ) -> DeviceArray:
        return self._linear(x, weight, out, prologue=RMSNORM, norm=norm, eps=eps)

    def linear_add_(
        self, residual: DeviceArray, x: DeviceArray, weight: Weight, *, gated: bool = False
    ) -> DeviceArray:
        prologue = GATED if gated else PLAIN
        return self._linear(x, weight, residual, accumulate=True, prologue=prologue)

    def attention(
        self,
        layer: int,
        qkv: DeviceArray,
        batch: ForwardBatch,
        heads: int,
        inv_freq: np.ndarray,
        scale: float,
        window: int,
        *,
        out: DeviceArray | None = None,
        softcap: float = 0.0,
    ) -> DeviceArray:
        """Split qkv into scratch q and, rotating q and k, k and v into the paged cache (for
        an int8 cache through scratch and its quantising write), then attend q of every
        sequence over its own blocks; -> (T, H * D)."""
        cache, up, s = batch.cache, self._pass.get, self.stream
        kv_heads, dim = cache.k[layer].shape[2], cache.k[layer].shape[3]
        tokens = qkv.shape[0]
        take = self.scratch.take
        q = take("q", (tokens, heads, dim), np.float32)
        # The pass's own copy: dynamic NTK and LongRoPE make new frequencies every pass
        positions, freqs = up(batch.positions, "positions"), up(inv_freq, "inv_freq")
        slots = up(batch.slots, "slots")
        kc, vc = cache.k[layer], cache.v[layer]
        if cache.k_scale is None:  # k and v go straight into the cache
            rope.split_rope(qkv, heads, kv_heads, dim, positions, freqs, (q, kc, vc), s, slots)
        else:  # quantised per row after the split (a row's scale needs all of it)
            k, v = (take(n, (tokens, kv_heads, dim), np.float32) for n in ("k", "v"))
            rope.split_rope(qkv, heads, kv_heads, dim, positions, freqs, (q, k, v), s)
        where = tuple(
            up(getattr(batch, name), name)
            for name in ("block_tables", "query_start", "context_lens")
        )
        splits, parts = 1, None
        if self._sm_count is not None:
            longest = int(batch.context_lens.max())
            splits = attention_splits(tokens, kv_heads, longest, self._sm_count)
        if splits > 1:
            shapes = partials_shapes(splits, tokens, heads, dim)
            names = ("part_acc", "part_max", "part_sum")
            parts = [self.scratch.take(n, sh, np.float32) for n, sh in zip(names, shapes)]
        out3 = None if out is None else out.reshape(tokens, heads, dim)
        if cache.k_scale is None:
            out3 = paged_attention(
                q, kc, vc, *where, scale, window, splits, out3, s, parts, softcap
            )
        else:
            ks, vs = cache.k_scale[layer], cache.v_scale[layer]
            write_kv_int8(kc, vc, ks, vs, k, v, slots, stream=s)
            out3 = paged_attention_int8(
                q, kc, vc, ks, vs, *where, scale, window, splits, out3, s, parts, softcap
            )
        return out3.reshape(tokens, heads * dim) if out is None else out

    def moe_add_(
        self,
        residual: DeviceArray,
        norm: DeviceArray,
        eps: float,
        experts: ExpertWeights,
        top_k: int,
        normalize: bool,
    ) -> DeviceArray:
        """As the CPU does it: each expert runs once over the tokens routed to it, its up
        half scaled by their routing weights, and its down projection adds into their rows
        of the residual, in expert order.

        One host read per MoE layer: the router's logits (T, E) come back to the host, which
        waits for the queued work, because the grouping decides which experts' launches
        happen at all (a decode step runs k of E). Routing and grouping then run on the host
        with the CPU's kernels; everything else stays on the device.
        """
        tokens, hidden = residual.shape
        take = self.scratch.take
        x = take("moe_x", (tokens, hidden), np.float32)
        norms.rmsnorm(residual, norm, eps, x, self.stream)
        logits = take("moe_logits", (tokens, experts.count), np.float32)
        self._linear(x, experts.router, logits)
        bounds, rows, scales = self._route(logits, top_k, normalize)
        for e in range(experts.count):
            lo, hi = bounds[e], bounds[e + 1]
            if lo < hi:
                gate_up, down = self._expert(experts, e)
                self._expert_add_(residual, x, gate_up, down, rows[lo:hi], scales[lo:hi])
                self.expert_bytes_read += experts.expert_nbytes(e)
        return residual

    def _expert(self, experts: ExpertWeights, e: int) -> tuple[Weight, Weight]:
        """Expert e's (gate_up, down) on the device: as they are, or from the expert cache
        when they were left in host memory."""
        gate_up, down = experts.gate_up[e], experts.down[e]
        if not _in_host_memory(gate_up):
            return gate_up, down
        if self.expert_cache is None:
            raise LaminaError(
                "the CUDA backend was handed an expert in host memory with no expert cache"
            )
        return self.expert_cache.fetch(
            gate_up, experts.expert_arrays(e), lambda arrays: experts.with_arrays(e, arrays)
        )

    def _route(
        self, logits: DeviceArray, top_k: int, normalize: bool
    ) -> tuple[list[int], DeviceArray, DeviceArray]:
        """Copy the router's logits to the host, pick each token's top_k experts and group
        the tokens by expert there; -> (expert e's entries are [bounds[e], bounds[e + 1]),
        device rows (token of each entry), device scales (its routing weight))."""
        tokens, count = logits.shape
        take = self.host_scratch.take
        host = take("moe_logits", (tokens, count), np.float32)
        logits.copy_to_host(host, stream=self.stream)
        self.stream.synchronize()
        ids = take("moe_ids", (tokens, top_k), np.int32)
        weights = take("moe_weights", (tokens, top_k), np.float32)
        route_top_k_into(host, normalize, ids, weights)
        starts = take("moe_starts", (count + 1,), np.int64)
        rows = take("moe_rows", (tokens * top_k,), np.int64)
        scales = take("moe_scales", (tokens * top_k,), np.float32)
        group_by_expert_into(ids, weights, starts, rows, scales)
        # Copies from pageable memory return once the source is staged, so the host arrays
        # may be refilled by the next layer while these copies are still queued.
        rows_d = self.scratch.take("moe_rows", rows.shape, np.int64)
        scales_d = self.scratch.take("moe_scales", scales.shape, np.float32)
        rows_d.copy_to_device(rows, stream=self.stream)
        scales_d.copy_to_device(scales, stream=self.stream)
        return starts.tolist(), rows_d, scales_d

    def _expert_add_(
        self,
        residual: DeviceArray,
        x: DeviceArray,
        gate_up: Weight,
        down: Weight,
        rows: DeviceArray,
        scales: DeviceArray,
    ) -> None:
        """residual[rows] += down(silu(gate) * up * scales) of gate_up(x[rows]): one expert
        over its n tokens."""
        (n,), (tokens, hidden) = rows.shape, x.shape
        f32, take, s = np.float32, self.scratch.take, self.stream
        # A token picks an expert at most once, so an expert with every token has rows
        # 0..T-1 in order: no gather or scatter (a decode step of one sequence).
        whole = n == tokens
        x_e = x
        if not whole:
            x_e = embedding.gather_rows(x, rows, take("moe_x_e", (n, hidden), f32), s)
        h = take("moe_gate_up", (n, gate_up.out_features), f32)
        self._linear(x_e, gate_up, h)
        moe.scale_up_half_(h, scales, s)
        if whole:
            self._linear(h, down, residual, accumulate=True, prologue=GATED)
        else:
            out = self._linear(h, down, take("moe_out", (n, hidden), f32), prologue=GATED)
            moe.add_rows_at(residual, rows, out, s)

    def scale_(self, x: DeviceArray, factor: float) -> DeviceArray:
        return elementwise.scale_inplace(x, factor, self.stream)

    def softcap_(self, x: DeviceArray, cap: float) -> DeviceArray:
        return elementwise.softcap_inplace(x, cap, self.stream)

    def glu(
        self, gate_up: DeviceArray, activation: str, *, out: DeviceArray | None = None
    ) -> DeviceArray:
        return _GATES[activation](gate_up, out, self.stream)

    def norm_add_(
        self, residual: DeviceArray, x: DeviceArray, norm: DeviceArray, eps: float
    ) -> DeviceArray:
        h = self.scratch.take("h", x.shape, np.float32)
        return elementwise.add_inplace(
            residual, norms.rmsnorm(x, norm, eps, h, self.stream), self.stream
        )

    def qk_norm_(
        self,
        qkv: DeviceArray,
        q_norm: DeviceArray,
        k_norm: DeviceArray,
        eps: float,
        heads: int,
        kv_heads: int,
    ) -> DeviceArray:
        norms.head_rmsnorm_(qkv, 0, heads, q_norm, eps, self.stream)
        norms.head_rmsnorm_(qkv, heads * q_norm.shape[0], kv_heads, k_norm, eps, self.stream)
        return qkv

    def take_rows(
        self, x: DeviceArray, rows: np.ndarray, *, out: DeviceArray | None = None
    ) -> DeviceArray:
        return embedding.gather_rows(x, self._pass.get(rows, "rows"), out, self.stream)

    def to_numpy(self, x: DeviceArray) -> np.ndarray:
        """Copy a device array to the host, waiting for the work queued before it: for a
        step's logits, a view of page-locked memory valid until the next call (as the CPU's
        workspace views are); a larger array (a whole prompt's logits) into new memory."""
        if x.size * x.dtype.itemsize <= PINNED_READBACK_BYTES:
            host = self._readback.take("out", tuple(x.shape), x.dtype)
            x.copy_to_host(host, stream=self.stream)
        else:
            host = x.copy_to_host(stream=self.stream)
        self.stream.synchronize()
        self._pass.settled()
        return host

    def free_memory(self) -> int:
        """Bytes free on the GPU (sizes the KV cache). The simulator's arrays live in RAM,
        and it reports infinite device memory, so there it is the RAM psutil sees."""
        if kernels_gpu.simulated():
            return psutil.virtual_memory().available
        return int(cuda.current_context().get_memory_info().free)

    def allocate_kv(self, shape: tuple[int, ...], dtype: str) -> DeviceArray:
        """Uninitialised device memory: attention reads only slots this pass or an earlier
        one wrote. Tied to the backend's stream, so the KV cache's copy-on-write block
        copies (`storage[:, new] = storage[:, old]`, a numba device copy) queue in order
        with the kernels instead of synchronising."""
        array = cuda.device_array(shape, dtype=np.dtype(dtype), stream=self.stream)
        self.allocated_bytes += array.nbytes
        return array


def _check_kernel(weight: Weight) -> None:
    """Refuse a weight format with no CUDA kernel, by the name users know it by."""
    parts = weight.parts if isinstance(weight, StackedWeight) else [weight]
    for part in parts:
        if not isinstance(part, _RUNNABLE):
            what = _NO_KERNEL.get(type(part), type(part).__name__)
            raise LaminaError(
                f"the CUDA backend has no kernel for {what} weights; run this model with "
                "--device cpu, or with --quant int8 (or f32)"
            )


def _in_host_memory(weight: Weight) -> bool:
    """Whether a weight's arrays are numpy arrays (not yet on the device)."""
    if isinstance(weight, StackedWeight):
        return _in_host_memory(weight.parts[0])
    first = weight.values if isinstance(weight, BlockWeight) else weight.data
    return isinstance(first, np.ndarray)
