"""Turn a float model into a sparse int8 one: prune, quantize, and store in a sparse format.

Weight sparsity prunes each decoder linear (magnitude or Wanda, unstructured or N:M, with
optional SparseGPT-style reconstruction), quantizes it to per-row int8 (zeros stay exactly
zero) and stores it in the bitmask format of `SparseInt8Weight`. Activation sparsity
calibrates, for each linear, the |x| threshold below which the chosen share of its inputs
fall, and stores the weight input-major (`ColskipInt8Weight`, or `ColskipBlockWeight` for
int4 ones, `quantize_skipping`) so that decode skips the rows of zeroed inputs. Embeddings
and the output head stay dense.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from engine.errors import InvalidInputError
from engine.quant.calibration import (
    InputStats,
    calibration_text,
    collect_input_stats,
    refuse_experts,
)
from engine.quant.formats import WeightPlan, convert_weights
from engine.quant.int8 import quantize_int8
from engine.quant.prune import PRUNE_METHODS, keep_mask, parse_pattern, prune_scores, reconstruct
from engine.weights import (
    LAYER_LINEARS,
    BlockWeight,
    ColskipBlockWeight,
    ColskipInt8Weight,
    DenseWeight,
    Int8Weight,
    SparseInt8Weight,
    Weight,
)
from kernels_cpu.colskip_blocks import GROUPS as SKIP_GROUPS
from kernels_cpu.colskip_blocks import factors_by_group, interleave_outputs
from kernels_cpu.colskip_int8 import to_input_major
from kernels_cpu.matmul_blocks import deinterleave_factors, deinterleave_nibbles
from kernels_cpu.sparse_int8 import pack_bitmask


@dataclass
class SparsityPlan:
    """What to prune and how. `overrides` maps "down", "3" or "3.down" to a layer's sparsity
    (the most specific key wins) so that sensitive layers can be pruned less."""

    sparsity: float = 0.0
    method: str = "wanda"
    pattern: str = "unstructured"
    activation_sparsity: float = 0.0
    reconstruct: bool = False
    overrides: dict[str, float] = field(default_factory=dict)
    calibration: str | None = None  # a text file; None: pydoc's topics
    calibration_tokens: int = 4096

    def __post_init__(self) -> None:
        if self.method not in PRUNE_METHODS:
            raise InvalidInputError(
                f"unknown pruning method {self.method!r}; choose from {PRUNE_METHODS}"
            )
        nm = parse_pattern(self.pattern)
        if nm is not None:
            implied = 1 - nm[0] / nm[1]
            for value in (self.sparsity, *self.overrides.values()):
                if value and abs(value - implied) > 1e-9:
                    raise InvalidInputError(
                        f"pattern {self.pattern} means sparsity {implied:g}, not {value:g}"
                    )
        for value in (self.sparsity, *self.overrides.values()):
            if not 0.0 <= value < 1.0:
                raise InvalidInputError(f"weight sparsity must be in [0, 1), got {value}")
        if not 0.0 <= self.activation_sparsity < 1.0:
            raise InvalidInputError(
                f"activation sparsity must be in [0, 1), got {self.activation_sparsity}"
            )
        unknown = [k for k in self.overrides if not _valid_override(k)]
        if unknown:
            raise InvalidInputError(
                f"layer sparsity key {unknown[0]!r} is not a linear name "
                f"({', '.join(LAYER_LINEARS)}), a layer index, or INDEX.NAME"
            )

    def sparsity_for(self, layer: int, name: str) -> float:
        for key in (f"{layer}.{name}", str(layer), name):
            if key in self.overrides:
                return self.overrides[key]
        return self.sparsity

    def describe(self) -> dict:
        """What a checkpoint records about how it was made."""
        return {
            "sparsity": self.sparsity,
            "method": self.method,
            "pattern": self.pattern,
            "layer_sparsity": self.overrides,
            "reconstruct": self.reconstruct,
            "activation_sparsity": self.activation_sparsity,
            "calibration": self.calibration or "pydoc_data.topics",
            "calibration_tokens": self.calibration_tokens,
        }

    @property
    def active(self) -> bool:
        return self.sparsity > 0 or self.activation_sparsity > 0 or any(self.overrides.values())


def _valid_override(key: str) -> bool:
    index, _, name = key.partition(".")
    if not name:
        return key in LAYER_LINEARS or key.isdigit()
    return index.isdigit() and name in LAYER_LINEARS


def sparsify(loaded, plan: SparsityPlan, stats: dict | None = None) -> None:
    """Replace the float decoder linears of `loaded` by pruned int8 ones, in place.

    `loaded` must hold float32 weights (pruning and calibration read the float model); the
    embedding table and output head become dense int8. `stats` (from collect_input_stats on
    the same float model) skips the calibration pass, for trying several plans.
    """
    weights = loaded.weights
    prunes = plan.sparsity > 0 or any(plan.overrides.values())
    refuse_experts(loaded.config, "pruning" if prunes else "activation sparsity")
    if not isinstance(weights.layers[0].qkv, DenseWeight):
        raise TypeError("sparsify needs the float32 model; load it without --quant")
    needs_stats = plan.method == "wanda" or plan.reconstruct or plan.activation_sparsity > 0
    if stats is None and needs_stats and plan.active:
        text = calibration_text(plan.calibration)
        stats = collect_input_stats(loaded, text, plan.calibration_tokens, gram=plan.reconstruct)
    for i, layer in enumerate(weights.layers):
        for name in LAYER_LINEARS:
            weight = getattr(layer, name)
            layer_stats = stats.get((i, name)) if stats else None
            setattr(layer, name, _sparse_linear(weight, plan, i, name, layer_stats))
    tied = weights.lm_head is weights.embed
    weights.embed = quantize_int8(weights.embed)
    weights.lm_head = weights.embed if tied else quantize_int8(weights.lm_head)


def _sparse_linear(
    weight: DenseWeight, plan: SparsityPlan, layer: int, name: str, stats: InputStats | None
) -> Weight:
    sparsity = plan.sparsity_for(layer, name)
    data = weight.data
    if sparsity > 0:
        nm = parse_pattern(plan.pattern)
        target = 1 - nm[0] / nm[1] if nm else sparsity
        norm = stats.norm if stats is not None else None
        mask = keep_mask(prune_scores(data, plan.method, norm), target, plan.pattern)
        if plan.reconstruct:
            data = reconstruct(data, mask, stats.gram)
        else:
            data = np.where(mask, data, np.float32(0.0)).astype(np.float32)
    q = quantize_int8(DenseWeight(data, weight.bias))
    if plan.activation_sparsity > 0:
        threshold = stats.threshold(plan.activation_sparsity)
        return ColskipInt8Weight(to_input_major(q.data), q.scale, threshold, q.bias)
    if sparsity > 0:
        return to_sparse(q)
    return q


def to_sparse(weight: Int8Weight) -> SparseInt8Weight:
    mask, values, row_ptr = pack_bitmask(weight.data)
    return SparseInt8Weight(mask, values, row_ptr, weight.scale, weight.in_features, weight.bias)


def quantize_skipping(loaded, weights: WeightPlan, plan: SparsityPlan, method: str) -> dict:
    """Quantize the float model `loaded` in place as `weights` says (int4 by round-to-nearest
    or GPTQ, `method`), then store each decoder linear input-major with its TEAL threshold:
    int4 as ColskipBlockWeight, int8 as ColskipInt8Weight. Weight sparsity does not combine
    with int4. Returns the recipe a checkpoint records."""
    if plan.sparsity > 0 or any(plan.overrides.values()) or plan.reconstruct:
        raise InvalidInputError(
            "weight sparsity (--sparsity, --pattern, --layer-sparsity, --reconstruct) makes "
            "int8 checkpoints; with int4 weights use --activation-sparsity alone"
        )
    refuse_experts(loaded.config, "activation sparsity")
    for i in range(loaded.config.num_layers):
        for name in LAYER_LINEARS:
            if weights.format_for(f"layers.{i}.{name}") not in ("int4", "int8"):
                raise InvalidInputError(
                    f"--activation-sparsity runs int4 and int8 linears; --layer-weights "
                    f"keeps layer {i}'s {name} in float32"
                )
    text = calibration_text(plan.calibration)
    stats = collect_input_stats(loaded, text, plan.calibration_tokens, gram=method == "gptq")
    fraction = plan.activation_sparsity
    thresholds = {key: s.threshold(fraction) for key, s in stats.items()}
    if method == "gptq":
        from engine.quant.gptq import quantize_gptq

        recipe = quantize_gptq(loaded, weights, plan.calibration, stats)
    else:
        convert_weights(loaded.weights, weights)
        recipe = {"quantization": {"method": "rtn", "group_size": weights.group_size}}
    for i, layer in enumerate(loaded.weights.layers):
        for name in LAYER_LINEARS:
            weight, threshold = getattr(layer, name), thresholds[(i, name)]
            if isinstance(weight, BlockWeight):
                skipping = to_colskip_blocks(weight, threshold)
            else:
                skipping = ColskipInt8Weight(
                    to_input_major(weight.data), weight.scale, threshold, weight.bias
                )
            setattr(layer, name, skipping)
    recipe["sparsity"] = plan.describe()
    return recipe


def to_colskip_blocks(weight: BlockWeight, threshold: float) -> ColskipBlockWeight:
    """lamina's 4-bit weight (float16 scale and minimum a group, `quantize_int4`) in the
    input-major layout of the activation-sparse kernel, the same values and factors."""
    if not (
        weight.bits == 4
        and weight.mins is not None
        and weight.scale.dtype == np.uint16
        and weight.scale_sup is None
        and weight.zero == 0
        and weight.group in SKIP_GROUPS
    ):
        raise TypeError(f"{weight.kind} weights have no activation-sparse layout")
    n = weight.out_features
    q = deinterleave_nibbles(weight.values, n)
    scale, mins = (
        factors_by_group(deinterleave_factors(a, n)) for a in (weight.scale, weight.mins)
    )
    return ColskipBlockWeight(
        interleave_outputs(q), scale, mins, weight.in_features, n, threshold, weight.bias
    )
