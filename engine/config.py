"""ModelConfig: the one description of a decoder-only transformer that the rest of lamina reads.

Hugging Face config.json and GGUF metadata name the same facts differently (and transformers 5
moved rope settings into `rope_parameters`); both are normalised here so that model code never
looks at a source format.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.errors import ModelLoadError, UnsupportedModelError

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")

# HF `architectures` entries and GGUF `general.architecture` values we accept, mapped to ours.
_ARCH_ALIASES = {
    "llama": "llama",
    "LlamaForCausalLM": "llama",
    "mistral": "mistral",
    "MistralForCausalLM": "mistral",
    "qwen2": "qwen2",
    "Qwen2ForCausalLM": "qwen2",
}

_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding settings; `inv_freq()` gives the per-pair frequencies."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    # GGUF files may carry llama3 scaling pre-computed as per-frequency divisors.
    freq_factors: tuple[float, ...] | None = None

    def inv_freq(self, head_dim: int) -> np.ndarray:
        """Inverse frequencies (head_dim // 2,), computed as transformers computes them."""
        exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim
        inv = (1.0 / (np.float32(self.theta) ** exponents)).astype(np.float32)
        if self.freq_factors is not None:
            return (inv / np.asarray(self.freq_factors, dtype=np.float32)).astype(np.float32)
        if self.rope_type == "linear":
            return (inv / np.float32(self.factor)).astype(np.float32)
        if self.rope_type == "llama3":
            return _llama3_inv_freq(inv, self)
        return inv


def _llama3_inv_freq(inv: np.ndarray, rope: RopeConfig) -> np.ndarray:
    """Llama 3.1 frequency-dependent scaling: low frequencies stretched, high kept."""
    low_wavelen = rope.original_max_position_embeddings / rope.low_freq_factor
    high_wavelen = rope.original_max_position_embeddings / rope.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / rope.factor, inv)
    smooth = (rope.original_max_position_embeddings / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig = field(default_factory=RopeConfig)
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # required q/k/v biases (qwen2; llama with attention_bias)
    o_bias: bool = False  # required o_proj bias (llama with attention_bias)
    mlp_bias: bool = False  # required gate/up/down biases (llama with mlp_bias)
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        sizes = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "max_position_embeddings",
        )
        for name in sizes:
            if getattr(self, name) < 1:
                raise ModelLoadError(
                    f"model config: {name} must be at least 1, got {getattr(self, name)}"
                )
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(
                f"num_attention_heads ({self.num_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise UnsupportedModelError(f"odd head_dim {self.head_dim} is not supported by RoPE")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def to_hf(self) -> dict[str, Any]:
        """A config.json that `from_hf` (and transformers) read back to this config."""
        model_type = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}[self.architecture]
        rope: dict[str, Any] = {"rope_type": self.rope.rope_type, "rope_theta": self.rope.theta}
        if self.rope.rope_type != "default":
            rope["factor"] = self.rope.factor
        if self.rope.rope_type == "llama3":
            rope.update(
                low_freq_factor=self.rope.low_freq_factor,
                high_freq_factor=self.rope.high_freq_factor,
                original_max_position_embeddings=self.rope.original_max_position_embeddings,
            )
        cfg: dict[str, Any] = {
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_parameters": rope,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.o_bias,
            "mlp_bias": self.mlp_bias,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids),
        }
        if self.rope.freq_factors is not None:  # llama3 scaling as a GGUF stores it
            cfg["lamina_rope_freq_factors"] = list(self.rope.freq_factors)
        if self.sliding_window:
            cfg["sliding_window"] = self.sliding_window
            cfg["use_sliding_window"] = True
        return cfg

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Build from a parsed config.json."""
        arch = _resolve_arch(cfg.get("model_type"), cfg.get("architectures") or [])
        try:
            hidden = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            kv_heads = int(cfg.get("num_key_value_heads") or heads)
            head_dim = int(cfg.get("head_dim") or hidden // max(heads, 1))
            window = None
            if arch == "mistral" or cfg.get("use_sliding_window"):
                window = cfg.get("sliding_window")
            return cls(
                architecture=arch,
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=kv_heads,
                head_dim=head_dim,
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
                rope=_rope_from_hf(cfg),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                qkv_bias=arch == "qwen2" or bool(cfg.get("attention_bias", False)),
                o_bias=arch != "qwen2" and bool(cfg.get("attention_bias", False)),
                mlp_bias=bool(cfg.get("mlp_bias", False)),
                sliding_window=int(window) if window else None,
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_ids=_as_id_tuple(cfg.get("eos_token_id")),
            )
        except KeyError as exc:
            raise ModelLoadError(
                f"config.json is missing the required key {exc.args[0]!r}"
            ) from None
        except (TypeError, ValueError, ZeroDivisionError) as exc:
            raise ModelLoadError(f"config.json has an invalid value: {exc}") from None

    @classmethod
    def from_gguf(cls, meta: dict[str, Any], freq_factors: np.ndarray | None = None) -> ModelConfig:
        """Build from GGUF metadata (keys as written by llama.cpp's converter)."""
        arch = _resolve_arch(meta.get("general.architecture"), [])
        p = f"{meta['general.architecture']}."
        try:
            hidden = int(meta[p + "embedding_length"])
            heads = int(meta[p + "attention.head_count"])
            kv_heads = int(meta.get(p + "attention.head_count_kv") or heads)
            head_dim = int(meta.get(p + "attention.key_length") or hidden // max(heads, 1))
            vocab = meta.get(p + "vocab_size") or len(meta.get("tokenizer.ggml.tokens", []))
            window = meta.get(p + "attention.sliding_window")
            rope = _rope_from_gguf(meta, p, freq_factors)
            return cls(
                architecture=arch,
                vocab_size=int(vocab),
                hidden_size=hidden,
                intermediate_size=int(meta[p + "feed_forward_length"]),
                num_layers=int(meta[p + "block_count"]),
                num_heads=heads,
                num_kv_heads=kv_heads,
                head_dim=head_dim,
                rms_norm_eps=float(meta.get(p + "attention.layer_norm_rms_epsilon", 1e-6)),
                max_position_embeddings=int(meta.get(p + "context_length", 2048)),
                rope=rope,
                tie_word_embeddings=False,  # decided by the loader from the tensors present
                qkv_bias=arch == "qwen2",
                sliding_window=int(window) if window else None,
                bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
                eos_token_ids=_as_id_tuple(meta.get("tokenizer.ggml.eos_token_id")),
            )
        except KeyError as exc:
            raise ModelLoadError(
                f"GGUF metadata is missing the required key {exc.args[0]!r}"
            ) from None


def _resolve_arch(model_type: Any, architectures: list[str]) -> str:
    for name in [model_type, *architectures]:
        if name in _ARCH_ALIASES:
            return _ARCH_ALIASES[name]
    shown = model_type or (architectures[0] if architectures else "none given")
    raise UnsupportedModelError(
        f"unsupported architecture {shown!r}; lamina supports {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def _as_id_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return (int(value),)


def _rope_from_hf(cfg: dict[str, Any]) -> RopeConfig:
    """Accept both transformers 4 (rope_theta + rope_scaling) and 5 (rope_parameters)."""
    params = dict(cfg.get("rope_scaling") or {})
    params.update(cfg.get("rope_parameters") or {})
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in _ROPE_TYPES:
        raise UnsupportedModelError(
            f"rope scaling type {rope_type!r} is not supported (supported: {', '.join(_ROPE_TYPES)})"
        )
    factors = cfg.get("lamina_rope_freq_factors")
    if factors is not None:
        return RopeConfig(theta=theta, freq_factors=tuple(float(f) for f in factors))
    return RopeConfig(
        theta=theta,
        rope_type=rope_type,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)),
    )


def _rope_from_gguf(meta: dict[str, Any], p: str, freq_factors: np.ndarray | None) -> RopeConfig:
    scaling = meta.get(p + "rope.scaling.type", "none")
    factor = float(meta.get(p + "rope.scaling.factor", 1.0) or 1.0)
    theta = float(meta.get(p + "rope.freq_base", 10000.0))
    if freq_factors is not None:
        return RopeConfig(theta=theta, freq_factors=tuple(float(f) for f in freq_factors))
    if scaling in ("none", "") or factor == 1.0:
        return RopeConfig(theta=theta)
    if scaling == "linear":
        return RopeConfig(theta=theta, rope_type="linear", factor=factor)
    raise UnsupportedModelError(f"GGUF rope scaling type {scaling!r} is not supported")
