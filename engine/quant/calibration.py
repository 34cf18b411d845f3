"""Calibration: run text through a float model and record what every linear layer sees.

Wanda needs the L2 norm of each input feature, SparseGPT the Gram matrix X^T X of the inputs,
and activation sparsity (TEAL) the distribution of |x| at each linear's input, so that a
magnitude threshold zeroes a chosen share of them. One pass collects all three, keyed by the
linear's place in the model: (layer index, "qkv" | "o_proj" | "gate_up" | "down").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import kernels_cpu
from engine.backends.cpu import CPUBackend
from engine.errors import InvalidInputError, UnsupportedModelError
from engine.weights import LAYER_LINEARS, ModelWeights

# |x| values kept per linear for threshold quantiles: a uniform subsample bounds memory.
MAX_SAMPLES = 1 << 18
LinearKey = tuple[int, str]


def default_calibration_text() -> str:
    """English prose every Python ships: the help topics of pydoc."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics))


def calibration_text(path: str | Path | None) -> str:
    if path is None:
        return default_calibration_text()
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"cannot read calibration text {path}: {exc}") from None


@dataclass
class InputStats:
    """What one linear layer's inputs looked like over the calibration tokens."""

    sum_sq: np.ndarray  # (in,) float64: sum over tokens of x_j^2
    gram: np.ndarray | None = None  # (in, in) float64 X^T X, when asked for
    samples: list[np.ndarray] = field(default_factory=list)  # |x| subsample, float32

    @property
    def norm(self) -> np.ndarray:
        """||X_j||: the L2 norm of each input feature, Wanda's weighting."""
        return np.sqrt(self.sum_sq)

    def threshold(self, sparsity: float) -> float:
        """The |x| below which a `sparsity` share of this layer's inputs fall."""
        if not 0.0 <= sparsity < 1.0:
            raise InvalidInputError(f"activation sparsity must be in [0, 1), got {sparsity}")
        if sparsity == 0.0:
            return 0.0
        return float(np.quantile(np.concatenate(self.samples), sparsity))


class _RecordingBackend(CPUBackend):
    """The CPU backend, noting the input of every linear call it serves: the fused ops
    compute theirs (the norm, the gate product) apart first, so it can be seen."""

    def __init__(self, names: dict[int, LinearKey], gram: bool, rng: np.random.Generator):
        super().__init__()
        self._names = names
        self._gram = gram
        self._rng = rng
        self.stats: dict[LinearKey, InputStats] = {}

    def linear(self, x: np.ndarray, weight, *, out: np.ndarray | None = None):
        self._record(weight, x)
        return super().linear(x, weight, out=out)

    def norm_linear(self, x, norm, eps, weight, *, out: np.ndarray | None = None):
        return self.linear(kernels_cpu.rmsnorm(x, norm, eps), weight, out=out)

    def linear_add_(self, residual, x, weight, *, gated: bool = False):
        h = kernels_cpu.silu_mul(x) if gated else x
        self._record(weight, h)
        return super().linear_add_(residual, h, weight)

    def _record(self, weight, x: np.ndarray) -> None:
        key = self._names.get(id(weight))
        if key is None:
            return
        stats = self.stats.get(key)
        if stats is None:
            stats = self.stats[key] = InputStats(np.zeros(x.shape[1]))
            if self._gram:
                stats.gram = np.zeros((x.shape[1], x.shape[1]))
        x64 = x.astype(np.float64)
        stats.sum_sq += (x64 * x64).sum(axis=0)
        if stats.gram is not None:
            stats.gram += x64.T @ x64
        flat = np.abs(x).reshape(-1)
        take = min(flat.size, max(1, MAX_SAMPLES * x.shape[0] // 4096))
        stats.samples.append(flat[self._rng.integers(0, flat.size, size=take)])


def refuse_experts(config, what: str) -> None:
    """Calibrated and pruning methods work per linear of a dense MLP; a mixture-of-experts
    model's experts each see only the tokens routed to them, which they do not handle."""
    if config.num_experts:
        raise UnsupportedModelError(
            f"{what} does not support mixture-of-experts models yet; quantize them with "
            "--weights int8 or int4 (round to nearest)"
        )


def linear_names(weights: ModelWeights) -> dict[int, LinearKey]:
    """id(weight) -> (layer, name) for the linears inside decoder blocks."""
    return {
        id(getattr(layer, name)): (i, name)
        for i, layer in enumerate(weights.layers)
        for name in LAYER_LINEARS
    }


def collect_input_stats(
    loaded, text: str, tokens: int = 4096, window: int = 512, gram: bool = False
) -> dict[LinearKey, InputStats]:
    """Run up to `tokens` tokens of `text` through `loaded` in windows of `window` tokens.

    The model should be the float one about to be pruned: statistics are of its own inputs.
    """
    from engine.engine_config import EngineConfig
    from engine.engine_loop import EngineLoop
    from engine.kv_cache import kv_bytes_per_token

    cfg = loaded.config
    refuse_experts(cfg, "calibration (GPTQ, Wanda, activation sparsity)")
    ids = loaded.tokenizer.encode(text)[:tokens]
    if len(ids) < 2:
        raise InvalidInputError("the calibration text is too short: it needs at least 2 tokens")
    window = min(window, cfg.max_position_embeddings)
    backend = _RecordingBackend(linear_names(loaded.weights), gram, np.random.default_rng(0))
    token_bytes = kv_bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, "float32")
    kv_mb = 2 * token_bytes * window / 2**20 + 1
    engine = EngineLoop(loaded, backend, EngineConfig(max_model_len=window, kv_cache_mb=kv_mb))
    for start in range(0, len(ids), window):
        chunk = ids[start : start + window]
        if len(chunk) >= 2:
            engine.prompt_logits(chunk)
    return backend.stats
