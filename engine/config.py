"""ModelConfig: the one description of a decoder-only transformer that the rest of lamina reads.

Hugging Face config.json and GGUF metadata name the same facts differently (and transformers 5
moved rope settings into `rope_parameters`); both are normalised here so that model code never
looks at a source format.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.errors import ModelLoadError, UnsupportedModelError

SUPPORTED_ARCHITECTURES = (
    "llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text", "qwen3_moe", "mixtral"
)  # fmt: skip

# HF `architectures` entries and GGUF `general.architecture` values we accept, mapped to ours.
_ARCH_ALIASES = {
    "llama": "llama",
    "LlamaForCausalLM": "llama",
    "mistral": "mistral",
    "MistralForCausalLM": "mistral",
    "qwen2": "qwen2",
    "Qwen2ForCausalLM": "qwen2",
    "qwen3": "qwen3",
    "Qwen3ForCausalLM": "qwen3",
    "phi3": "phi3",
    "Phi3ForCausalLM": "phi3",
    "gemma3_text": "gemma3_text",
    "Gemma3ForCausalLM": "gemma3_text",
    "gemma2": "gemma2",
    "Gemma2ForCausalLM": "gemma2",
    "qwen3_moe": "qwen3_moe",
    "qwen3moe": "qwen3_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "mixtral": "mixtral",
    "MixtralForCausalLM": "mixtral",
}
# Gated MLP activations, by the names configs give them.
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh"}

_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic", "longrope")
# Older names transformers still reads.
_ROPE_ALIASES = {"su": "longrope"}
# GGUF `general.architecture` values named otherwise on the Hub (where model_type "gemma3"
# is the multimodal model, whose config.json nests the text model's).
_GGUF_ARCHITECTURES = {"gemma3": "gemma3_text"}
# No model has 2**31 of anything per layer: larger sizes come from corrupt files.
_MAX_SIZE = 2**31 - 1


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
    # YaRN's ramp bounds (in rotations) and whether they round to whole dimensions.
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    # The factor on cos and sin (YaRN, LongRoPE); None: derived from `factor` as
    # transformers derives it.
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    # LongRoPE's per-frequency divisors below and above original_max_position_embeddings.
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        positive = {
            "rope_theta": self.theta,
            "rope factor": self.factor,
            "rope low_freq_factor": self.low_freq_factor,
            "rope high_freq_factor": self.high_freq_factor,
        }
        for name, value in positive.items():
            if not (math.isfinite(value) and value > 0):
                raise ModelLoadError(f"model config: {name} must be a positive number, got {value}")
        optional = {"rope attention_factor": self.attention_factor, "rope mscale": self.mscale,
                    "rope mscale_all_dim": self.mscale_all_dim}  # fmt: skip
        for name, value in optional.items():
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ModelLoadError(f"model config: {name} must be a positive number, got {value}")
        if self.rope_type == "yarn" and not (
            self.beta_fast > 0 and self.beta_slow > 0 and self.theta != 1.0
        ):
            raise ModelLoadError(
                "model config: YaRN needs positive beta_fast and beta_slow and rope_theta "
                f"other than 1, got {self.beta_fast}, {self.beta_slow}, {self.theta}"
            )
        if self.rope_type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ModelLoadError(
                f"model config: rope high_freq_factor ({self.high_freq_factor}) must exceed "
                f"low_freq_factor ({self.low_freq_factor})"
            )
        if not 1 <= self.original_max_position_embeddings <= _MAX_SIZE:
            raise ModelLoadError(
                "model config: rope original_max_position_embeddings must be at least 1, got "
                f"{self.original_max_position_embeddings}"
            )
        if self.freq_factors is not None and not all(
            math.isfinite(f) and f > 0 for f in self.freq_factors
        ):
            raise ModelLoadError("model config: rope frequency factors must be positive numbers")

    def to_hf(self) -> dict[str, Any]:
        """These settings as config.json's rope_parameters."""
        rope: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.theta}
        if self.rope_type != "default":
            rope["factor"] = self.factor
        if self.rope_type == "llama3":
            rope.update(
                low_freq_factor=self.low_freq_factor,
                high_freq_factor=self.high_freq_factor,
                original_max_position_embeddings=self.original_max_position_embeddings,
            )
        if self.rope_type in ("yarn", "longrope"):
            rope["original_max_position_embeddings"] = self.original_max_position_embeddings
            rope["attention_factor"] = self.cos_sin_factor()
        if self.rope_type == "yarn":
            rope.update(beta_fast=self.beta_fast, beta_slow=self.beta_slow, truncate=self.truncate)
        if self.rope_type == "longrope":
            rope.update(short_factor=list(self.short_factor), long_factor=list(self.long_factor))
        return rope

    @property
    def varies_with_length(self) -> bool:
        """Whether the frequencies depend on the sequence length (dynamic NTK, LongRoPE)."""
        return self.rope_type in ("dynamic", "longrope")

    def inv_freq(self, head_dim: int, seq_len: int = 0) -> np.ndarray:
        """Inverse frequencies (head_dim // 2,), computed as transformers computes them, for
        a pass whose longest sequence is `seq_len` tokens (read by dynamic NTK and LongRoPE,
        which transformers recomputes from the pass's largest position)."""
        exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim
        theta = np.float32(self.theta)
        if self.rope_type == "dynamic" and seq_len > self.original_max_position_embeddings:
            grown = self.factor * seq_len / self.original_max_position_embeddings - (
                self.factor - 1
            )
            theta = np.float32(self.theta * grown ** (head_dim / (head_dim - 2)))
        inv = (1.0 / (theta**exponents)).astype(np.float32)
        if self.freq_factors is not None:
            return (inv / np.asarray(self.freq_factors, dtype=np.float32)).astype(np.float32)
        if self.rope_type == "linear":
            return (inv / np.float32(self.factor)).astype(np.float32)
        if self.rope_type == "llama3":
            return _llama3_inv_freq(inv, self)
        if self.rope_type == "yarn":
            return _yarn_inv_freq(theta**exponents, self, head_dim)
        if self.rope_type == "longrope":
            long = seq_len > self.original_max_position_embeddings
            factors = np.asarray(self.long_factor if long else self.short_factor, np.float32)
            return (1.0 / (factors * theta**exponents)).astype(np.float32)
        return inv

    def cos_sin_factor(self) -> float:
        """What transformers multiplies cos and sin by (YaRN's and LongRoPE's attention
        factor; 1 otherwise). Scaling q and k by it scales their products by its square."""
        if self.attention_factor is not None:
            return self.attention_factor
        if self.rope_type == "yarn":
            if self.mscale and self.mscale_all_dim:
                return _yarn_mscale(self.factor, self.mscale) / _yarn_mscale(
                    self.factor, self.mscale_all_dim
                )
            return _yarn_mscale(self.factor, 1.0)
        if self.rope_type == "longrope" and self.factor > 1:
            original = self.original_max_position_embeddings
            return math.sqrt(1 + math.log(self.factor) / math.log(original))
        return 1.0


def _yarn_mscale(scale: float, mscale: float) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_inv_freq(pos_freqs: np.ndarray, rope: RopeConfig, dim: int) -> np.ndarray:
    """YaRN: interpolated low frequencies, extrapolated high ones, a linear ramp between the
    dimensions that turn beta_slow and beta_fast times over the original context."""

    def correction_dim(rotations: float) -> float:
        original = rope.original_max_position_embeddings
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers does, against a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation = (1 - ramp).astype(np.float32)
    inv_extra = (1.0 / pos_freqs).astype(np.float32)
    inv_inter = (1.0 / (np.float32(rope.factor) * pos_freqs)).astype(np.float32)
    return (inv_inter * (1 - extrapolation) + inv_extra * extrapolation).astype(np.float32)


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
    qk_norm: bool = False  # an RMSNorm over each head of q and of k before rope (qwen3)
    fused_projections: bool = False  # q/k/v and gate/up stored fused (phi3's qkv_proj)
    # Gemma 3: norms after attention and after the MLP too ("sandwich"), stored weights w
    # applied as 1 + w, embeddings scaled by sqrt(hidden), a GELU (tanh) gate, the softmax
    # scale from query_pre_attn_scalar, and per-layer windows (0: global) whose sliding
    # layers rotate with their own rope.
    sandwich_norms: bool = False
    norm_plus_one: bool = False
    embed_scale: float = 1.0
    mlp_activation: str = "silu"
    attention_scale: float | None = None
    layer_windows: tuple[int, ...] | None = None
    rope_local: RopeConfig | None = None
    # Gemma 2's soft-capping: attention scores and final logits x become cap * tanh(x / cap)
    # (0: none).
    attention_softcap: float = 0.0
    final_softcap: float = 0.0
    # Mixture of experts (qwen3_moe, mixtral): in each MoE layer a router picks
    # `experts_per_token` of `num_experts` SwiGLU experts of width `expert_intermediate_size`
    # per token, weighted by their softmax probabilities (renormalised over the chosen ones
    # when `normalize_top_k`); `dense_layers` keep a plain MLP of `intermediate_size`.
    num_experts: int = 0
    experts_per_token: int = 0
    expert_intermediate_size: int = 0
    normalize_top_k: bool = False
    dense_layers: tuple[int, ...] = ()
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
            if not 1 <= getattr(self, name) <= _MAX_SIZE:
                raise ModelLoadError(
                    f"model config: {name} must be at least 1 (and below 2**31), "
                    f"got {getattr(self, name)}"
                )
        if not (math.isfinite(self.rms_norm_eps) and self.rms_norm_eps >= 0):
            raise ModelLoadError(
                f"model config: rms_norm_eps must be a non-negative number, got {self.rms_norm_eps}"
            )
        if self.sliding_window is not None and not 1 <= self.sliding_window <= _MAX_SIZE:
            raise ModelLoadError(
                f"model config: sliding_window must be at least 1, got {self.sliding_window}"
            )
        for name in ("short_factor", "long_factor"):
            values = getattr(self.rope, name)
            if values is not None and len(values) != self.head_dim // 2:
                raise ModelLoadError(
                    f"model config: {len(values)} rope {name} values for head_dim "
                    f"{self.head_dim}; expected {self.head_dim // 2}"
                )
        factors = self.rope.freq_factors
        if factors is not None and len(factors) != self.head_dim // 2:
            raise ModelLoadError(
                f"model config: {len(factors)} rope frequency factors for head_dim "
                f"{self.head_dim}; expected {self.head_dim // 2}"
            )
        if self.layer_windows is not None and len(self.layer_windows) != self.num_layers:
            raise ModelLoadError(
                f"model config: {len(self.layer_windows)} layer windows for {self.num_layers} layers"
            )
        if self.num_experts and not (
            1 <= self.experts_per_token <= self.num_experts
            and 1 <= self.expert_intermediate_size <= _MAX_SIZE
        ):
            raise ModelLoadError(
                f"model config: {self.experts_per_token} experts per token of "
                f"{self.num_experts}, of width {self.expert_intermediate_size}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(
                f"num_attention_heads ({self.num_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise UnsupportedModelError(f"odd head_dim {self.head_dim} is not supported by RoPE")

    def window(self, layer: int) -> int:
        """Layer `layer`'s attention window in tokens (0: the whole context)."""
        if self.layer_windows is not None:
            return self.layer_windows[layer]
        return self.sliding_window or 0

    def is_moe(self, layer: int) -> bool:
        """Whether layer `layer`'s MLP is a mixture of experts."""
        return self.num_experts > 0 and layer not in self.dense_layers

    def layer_rope(self, layer: int) -> RopeConfig:
        """The rope of layer `layer`: sliding layers may have their own (Gemma 3)."""
        if self.rope_local is not None and self.window(layer):
            return self.rope_local
        return self.rope

    @property
    def context_limit(self) -> int:
        """The longest context the model is meant for: max_position_embeddings, stretched by
        the factor of dynamic NTK, and of YaRN over its original context (as vLLM derives
        it)."""
        rope = self.rope
        if rope.rope_type == "dynamic":
            return int(self.max_position_embeddings * rope.factor)
        if rope.rope_type == "yarn":
            stretched = int(rope.original_max_position_embeddings * rope.factor)
            return max(stretched, self.max_position_embeddings)
        return self.max_position_embeddings

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def to_hf(self) -> dict[str, Any]:
        """A config.json that `from_hf` (and transformers) read back to this config."""
        model_type = self.architecture
        rope = self.rope.to_hf()
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
        if self.num_experts:
            cfg.update(_moe_to_hf(self))
        if self.architecture.startswith("gemma"):
            if self.rope_local is not None:
                cfg["rope_parameters"] = {"full_attention": rope,
                                          "sliding_attention": self.rope_local.to_hf()}  # fmt: skip
            cfg["attn_logit_softcapping"] = self.attention_softcap or None
            cfg["final_logit_softcapping"] = self.final_softcap or None
            cfg["layer_types"] = [
                "sliding_attention" if self.window(i) else "full_attention"
                for i in range(self.num_layers)
            ]
            cfg["query_pre_attn_scalar"] = self.attention_scale**-2
            names = {ours: theirs for theirs, ours in reversed(_ACTIVATIONS.items())}
            cfg["hidden_activation"] = names[self.mlp_activation]
        return cfg

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Build from a parsed config.json."""
        f = _Fields(cfg, "config.json")
        architectures = cfg.get("architectures")
        arch = _resolve_arch(
            cfg.get("model_type"), architectures if isinstance(architectures, list) else []
        )
        hidden = f.integer("hidden_size")
        heads = f.integer("num_attention_heads")
        window = None
        if arch in ("mistral", "mixtral", "phi3", "gemma2", "gemma3_text") or f.flag(
            "use_sliding_window", False
        ):
            window = f.integer("sliding_window", None) or None
        gemma = _gemma_fields(cfg, f, window, arch) if arch.startswith("gemma") else {}
        return cls(
            architecture=arch,
            vocab_size=f.integer("vocab_size"),
            hidden_size=hidden,
            intermediate_size=f.integer("intermediate_size"),
            num_layers=f.integer("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=f.integer("num_key_value_heads", None) or heads,
            head_dim=f.integer("head_dim", None) or hidden // max(heads, 1),
            rms_norm_eps=f.number("rms_norm_eps", 1e-6),
            max_position_embeddings=f.integer("max_position_embeddings", 2048),
            rope=gemma.pop("rope", None) or _rope_from_hf(cfg, f),
            tie_word_embeddings=gemma.pop("tie_word_embeddings", None)
            if gemma
            else f.flag("tie_word_embeddings", False),
            qkv_bias=arch == "qwen2" or f.flag("attention_bias", False),
            o_bias=arch != "qwen2" and f.flag("attention_bias", False),
            qk_norm=arch in ("qwen3", "gemma3_text", "qwen3_moe"),
            fused_projections=arch == "phi3",
            mlp_bias=f.flag("mlp_bias", False),
            **gemma,
            **_moe_from_hf(arch, f),
            sliding_window=window,
            bos_token_id=f.token_id("bos_token_id"),
            eos_token_ids=f.token_ids("eos_token_id"),
        )

    @classmethod
    def from_gguf(
        cls, meta: dict[str, Any], rope_tensors: Mapping[str, np.ndarray] | None = None
    ) -> ModelConfig:
        """Build from GGUF metadata (keys as written by llama.cpp's converter), and the
        file's rope tensors by the RopeConfig field they fill (llama3's freq_factors,
        LongRoPE's short_factor and long_factor; see tensor_source.GGUF_ROPE_TENSORS).

        The keys llama.cpp requires are required here too (context length and norm epsilon
        included), so a key whose name was corrupted is not silently replaced by a default.
        """
        name = meta.get("general.architecture")
        known = _GGUF_ARCHITECTURES.get(name, name) if isinstance(name, str) else name
        arch = _resolve_arch(known, [])
        p = f"{meta['general.architecture']}."
        f = _Fields(meta, "GGUF metadata")
        moe = _moe_from_gguf(f, p)
        if moe and arch == "llama":
            arch = "mixtral"
        elif arch in ("qwen3_moe", "mixtral") and not moe:
            raise ModelLoadError(f"GGUF metadata: {arch} without {p}expert_count")
        hidden = f.integer(p + "embedding_length")
        heads = f.integer(p + "attention.head_count")
        tokens = meta.get("tokenizer.ggml.tokens")
        window = f.integer(p + "attention.sliding_window", None)
        layers = f.integer(p + "block_count")
        head_dim = f.integer(p + "attention.key_length", None) or hidden // max(heads, 1)
        gemma = {}
        if arch.startswith("gemma"):
            gemma = _gemma_from_gguf(arch, f, p, layers, window, hidden // max(heads, 1), head_dim)
        return cls(
            architecture=arch,
            vocab_size=f.integer(p + "vocab_size", None)
            or (len(tokens) if isinstance(tokens, list) else 0),
            hidden_size=hidden,
            intermediate_size=f.integer(p + "feed_forward_length"),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=f.integer(p + "attention.head_count_kv", None) or heads,
            head_dim=head_dim,
            rms_norm_eps=f.number(p + "attention.layer_norm_rms_epsilon"),
            max_position_embeddings=f.integer(p + "context_length"),
            rope=_rope_from_gguf(f, p, rope_tensors or {}),
            tie_word_embeddings=False,  # decided by the loader from the tensors present
            qkv_bias=arch == "qwen2",
            qk_norm=arch in ("qwen3", "qwen3_moe", "gemma3_text"),
            fused_projections=arch == "phi3",
            sliding_window=window or None,
            **gemma,
            **moe,
            bos_token_id=f.token_id("tokenizer.ggml.bos_token_id"),
            eos_token_ids=f.token_ids("tokenizer.ggml.eos_token_id"),
        )


_REQUIRED: Any = object()  # the default of _Fields.integer for keys that must be present


class _Fields:
    """Typed reads of a config.json object or GGUF metadata.

    A missing required key or a value of the wrong kind (a string for a size, a float for a
    count, NaN for an epsilon) is a ModelLoadError naming the key, never a TypeError later.
    A key that is absent or null takes its default.
    """

    def __init__(self, values: Mapping[str, Any], source: str) -> None:
        self.values = values
        self.source = source

    def _get(self, key: str, default: Any) -> Any:
        value = self.values.get(key)
        if value is None and default is _REQUIRED:
            raise ModelLoadError(f"{self.source} is missing the required key {key!r}")
        return value

    def invalid(self, key: str, value: Any, expected: str) -> ModelLoadError:
        return ModelLoadError(f"{self.source}: {key} must be {expected}, got {value!r}")

    def integer(self, key: str, default: Any = _REQUIRED) -> Any:
        value = self._get(key, default)
        if value is None:
            return default
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # 4096.0 in a hand-written config
        if not _is_int(value):
            raise self.invalid(key, value, "an integer")
        return value

    def number(self, key: str, default: Any = _REQUIRED) -> float:
        value = self._get(key, default)
        if value is None:
            return default
        if not _is_number(value) or not math.isfinite(value):
            raise self.invalid(key, value, "a finite number")
        return float(value)

    def flag(self, key: str, default: bool) -> bool:
        value = self._get(key, default)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.invalid(key, value, "true or false")
        return value

    def text(self, key: str, default: str) -> str:
        value = self._get(key, default)
        if value is None:
            return default
        if not isinstance(value, str):
            raise self.invalid(key, value, "a string")
        return value

    def token_ids(self, key: str) -> tuple[int, ...]:
        """A token id or a list of them (transformers allows both for eos_token_id)."""
        value = self.values.get(key)
        ids = tuple(v for v in (value if isinstance(value, list) else [value]) if v is not None)
        if not all(_is_int(v) and v >= 0 for v in ids):
            raise self.invalid(key, value, "a token id or a list of them")
        return ids

    def token_id(self, key: str) -> int | None:
        value = self.values.get(key)
        if value is not None and not (_is_int(value) and value >= 0):
            raise self.invalid(key, value, "a token id")
        return value

    def mapping(self, key: str) -> dict[str, Any]:
        value = self.values.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.invalid(key, value, "an object")
        return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _resolve_arch(model_type: Any, architectures: list[Any]) -> str:
    for name in [model_type, *architectures]:
        if isinstance(name, str) and name in _ARCH_ALIASES:
            return _ARCH_ALIASES[name]
    shown = model_type or (architectures[0] if architectures else "none given")
    raise UnsupportedModelError(
        f"unsupported architecture {shown!r}; lamina supports {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def _gemma_fields(cfg: dict[str, Any], f: _Fields, window: int | None, arch: str) -> dict[str, Any]:
    """ModelConfig fields of a Gemma 2 or 3 config.json (transformers 5's layout:
    layer_types, and for Gemma 3 rope_parameters per layer type; or the Hub's), with
    transformers' defaults: Gemma 2 alternates sliding and global layers and soft-caps
    at 50 (attention) and 30 (logits) unless its config says null; Gemma 3 has a global
    layer in six, a rope of its own for the sliding ones and no soft-capping."""
    gemma2 = arch == "gemma2"
    caps = {}
    for key, field_name, default in (("attn_logit_softcapping", "attention_softcap", 50.0),
                                     ("final_logit_softcapping", "final_softcap", 30.0)):  # fmt: skip
        value = cfg.get(key, default if gemma2 else None)
        if value is not None and not (_is_number(value) and math.isfinite(value) and value > 0):
            raise f.invalid(key, value, "a positive number or null")
        caps[field_name] = float(value or 0.0)
    activation = f.text("hidden_activation", "gelu_pytorch_tanh")
    if activation not in _ACTIVATIONS:
        raise UnsupportedModelError(f"MLP activation {activation!r} is not supported")
    types = cfg.get("layer_types")
    layers = f.integer("num_hidden_layers")
    if types is None:  # the Hub's layout: every pattern-th layer global, as transformers reads it
        pattern = f.integer("sliding_window_pattern", 2 if gemma2 else 6)
        if pattern < 1:
            raise f.invalid("sliding_window_pattern", pattern, "at least 1")
        types = ["sliding_attention" if (i + 1) % pattern else "full_attention"
                 for i in range(layers)]  # fmt: skip
    if not isinstance(types, list) or len(types) != layers:
        raise f.invalid("layer_types", types, f"a list of {layers} layer types")
    if any(t not in ("sliding_attention", "full_attention") for t in types):
        raise f.invalid("layer_types", types, "sliding_attention or full_attention entries")
    per_type = f.mapping("rope_parameters")
    if gemma2:  # one rope for every layer
        ropes = {"full_attention": _rope_from_hf(cfg, f), "sliding_attention": None}
    elif "full_attention" in per_type:
        ropes = {kind: _rope_of_type(cfg, per_type, kind, f)
                 for kind in ("full_attention", "sliding_attention")}  # fmt: skip
    else:  # the Hub's layout: rope_theta and rope_scaling for the global layers,
        ropes = {  # rope_local_base_freq for the sliding ones
            "full_attention": _rope_from_hf(cfg, f),
            "sliding_attention": RopeConfig(theta=f.number("rope_local_base_freq", 10000.0)),
        }
    hidden = f.integer("hidden_size")
    query_scalar = f.number("query_pre_attn_scalar", 256.0)
    if query_scalar <= 0:
        raise f.invalid("query_pre_attn_scalar", query_scalar, "a positive number")
    window = window or 4096  # transformers' default for Gemma 3
    return {
        "sandwich_norms": True,
        "norm_plus_one": True,
        "embed_scale": float(np.float32(math.sqrt(hidden))),
        "mlp_activation": _ACTIVATIONS[activation],
        "attention_scale": query_scalar**-0.5,
        "layer_windows": tuple(window if t == "sliding_attention" else 0 for t in types),
        "tie_word_embeddings": f.flag("tie_word_embeddings", True),
        "rope": ropes["full_attention"],
        "rope_local": ropes["sliding_attention"],
        **caps,
    }


def _moe_from_hf(arch: str, f: _Fields) -> dict[str, Any]:
    """ModelConfig's mixture-of-experts fields of a Qwen3-MoE or Mixtral config.json, as
    transformers reads them (Qwen3-MoE's plain-MLP layers from mlp_only_layers and
    decoder_sparse_step; Mixtral always renormalises its top k)."""
    if arch == "mixtral":
        return {
            "num_experts": f.integer("num_local_experts", 8),
            "experts_per_token": f.integer("num_experts_per_tok", 2),
            "expert_intermediate_size": f.integer("intermediate_size"),
            "normalize_top_k": True,
        }
    if arch != "qwen3_moe":
        return {}
    layers, step = f.integer("num_hidden_layers"), f.integer("decoder_sparse_step", 1)
    only = f.values.get("mlp_only_layers") or []
    if not isinstance(only, list) or not all(_is_int(i) for i in only):
        raise f.invalid("mlp_only_layers", only, "a list of layer indices")
    if step < 1:
        raise f.invalid("decoder_sparse_step", step, "at least 1")
    # transformers 5 writes num_local_experts; the Hub's configs say num_experts
    experts = f.integer("num_local_experts", None) or f.integer("num_experts", 128)
    dense = tuple(i for i in range(layers) if i in only or (i + 1) % step or not experts)
    return {
        "num_experts": experts,
        "experts_per_token": f.integer("num_experts_per_tok", 8),
        "expert_intermediate_size": f.integer("moe_intermediate_size", 768),
        "normalize_top_k": f.flag("norm_topk_prob", False),
        "dense_layers": dense,
    }


def _moe_to_hf(c: ModelConfig) -> dict[str, Any]:
    """config.json's mixture-of-experts keys that `_moe_from_hf` reads back to `c`."""
    if c.architecture == "mixtral":
        return {"num_local_experts": c.num_experts, "num_experts_per_tok": c.experts_per_token}
    return {
        "num_experts": c.num_experts,
        "num_experts_per_tok": c.experts_per_token,
        "moe_intermediate_size": c.expert_intermediate_size,
        "norm_topk_prob": c.normalize_top_k,
        "mlp_only_layers": list(c.dense_layers),
    }


def _moe_from_gguf(f: _Fields, p: str) -> dict[str, Any]:
    """The mixture-of-experts fields of GGUF metadata. llama.cpp's converter writes Mixtral
    as a llama with an expert count; llama.cpp always renormalises Qwen3-MoE's and Mixtral's
    top k (unless a file says otherwise)."""
    experts = f.integer(p + "expert_count", 0)
    if not experts:
        return {}
    return {
        "num_experts": experts,
        "experts_per_token": f.integer(p + "expert_used_count"),
        "expert_intermediate_size": f.integer(p + "expert_feed_forward_length", None)
        or f.integer(p + "feed_forward_length"),
        "normalize_top_k": f.flag(p + "expert_weights_norm", True),
    }


def _rope_of_type(cfg: dict[str, Any], per_type: dict, kind: str, f: _Fields) -> RopeConfig:
    """The rope of one layer type from transformers 5's per-type rope_parameters."""
    params = per_type.get(kind)
    if not isinstance(params, dict):
        raise f.invalid("rope_parameters", per_type, f"an object per layer type ({kind})")
    own = {**cfg, "rope_parameters": params, "rope_scaling": None}
    return _rope_from_hf(own, _Fields(own, "config.json"))


def _rope_from_hf(cfg: dict[str, Any], f: _Fields) -> RopeConfig:
    """Accept both transformers 4 (rope_theta + rope_scaling) and 5 (rope_parameters)."""
    params = {**f.mapping("rope_scaling"), **f.mapping("rope_parameters")}
    r = _Fields(params, "config.json rope_parameters")
    theta = r.number("rope_theta", f.number("rope_theta", 10000.0))
    rope_type = r.text("rope_type", r.text("type", "default"))
    rope_type = _ROPE_ALIASES.get(rope_type, rope_type)
    if r.number("partial_rotary_factor", f.number("partial_rotary_factor", 1.0)) != 1.0:
        raise UnsupportedModelError(
            "partial rotary embeddings (partial_rotary_factor) are not supported"
        )
    if rope_type not in _ROPE_TYPES:
        raise UnsupportedModelError(
            f"rope scaling type {rope_type!r} is not supported (supported: {', '.join(_ROPE_TYPES)})"
        )
    factors = cfg.get("lamina_rope_freq_factors")
    if factors is not None:
        if not isinstance(factors, list) or not all(_is_number(v) for v in factors):
            raise f.invalid("lamina_rope_freq_factors", factors, "a list of numbers")
        return RopeConfig(theta=theta, freq_factors=tuple(float(v) for v in factors))
    max_positions = f.integer("max_position_embeddings", 2048)
    # Dynamic NTK grows past max_position_embeddings; the others read the original context
    # from the rope parameters, or (Phi-3) from the top level of config.json.
    original = r.integer("original_max_position_embeddings", None) or f.integer(
        "original_max_position_embeddings", None
    )
    if rope_type == "dynamic" or (original is None and rope_type in ("yarn", "longrope")):
        original = max_positions  # transformers' fallback
    factor = r.number("factor", None)
    if factor is None:  # YaRN and LongRoPE derive it as transformers does
        factor = max_positions / original if original and rope_type in ("yarn", "longrope") else 1.0
    return RopeConfig(
        theta=theta,
        rope_type=rope_type,
        factor=factor,
        low_freq_factor=r.number("low_freq_factor", 1.0),
        high_freq_factor=r.number("high_freq_factor", 4.0),
        original_max_position_embeddings=original or 8192,
        beta_fast=r.number("beta_fast", 32.0),
        beta_slow=r.number("beta_slow", 1.0),
        truncate=r.flag("truncate", True),
        attention_factor=r.number("attention_factor", None),
        mscale=r.number("mscale", None),
        mscale_all_dim=r.number("mscale_all_dim", None),
        short_factor=_factors(r, "short_factor", rope_type),
        long_factor=_factors(r, "long_factor", rope_type),
    )


def _factors(r: _Fields, key: str, rope_type: str) -> tuple[float, ...] | None:
    """LongRoPE's per-frequency factor list `key` (required for longrope)."""
    value = r.values.get(key)
    if rope_type != "longrope":
        return None
    if not isinstance(value, list) or not value or not all(_is_number(v) and v > 0 for v in value):
        raise r.invalid(key, value, "a list of positive numbers")
    return tuple(float(v) for v in value)


def _rope_from_gguf(f: _Fields, p: str, tensors: Mapping[str, np.ndarray]) -> RopeConfig:
    """The rope of GGUF metadata and the file's rope tensors (keyed by RopeConfig field).

    LongRoPE (Phi-3) is told by its factor tensors, as llama.cpp tells it (the converter
    writes no scaling type for it): the attention factor is the file's, 1 without one, as
    llama.cpp reads it. llama.cpp picks the long factors for a context longer than the
    original; lamina, as transformers, for a pass whose sequences are.
    """
    scaling = f.text(p + "rope.scaling.type", "none")
    factor = f.number(p + "rope.scaling.factor", 1.0) or 1.0
    theta = f.number(p + "rope.freq_base", 10000.0)
    if tensors.get("freq_factors") is not None:
        return RopeConfig(theta=theta, freq_factors=_tensor_values(tensors["freq_factors"]))
    long, short = tensors.get("long_factor"), tensors.get("short_factor")
    if long is not None or short is not None or scaling == "longrope":
        if long is None or short is None:
            raise ModelLoadError(
                "GGUF LongRoPE needs both tensors rope_factors_long.weight and "
                "rope_factors_short.weight"
            )
        original = f.integer(p + "rope.scaling.original_context_length")
        if original < 1:
            raise f.invalid(p + "rope.scaling.original_context_length", original, "at least 1")
        return RopeConfig(
            theta=theta,
            rope_type="longrope",
            factor=max(f.integer(p + "context_length") / original, 1.0),
            original_max_position_embeddings=original,
            attention_factor=f.number(p + "rope.scaling.attn_factor", 1.0),
            short_factor=_tensor_values(short),
            long_factor=_tensor_values(long),
        )
    if scaling in ("none", "") or factor == 1.0:
        return RopeConfig(theta=theta)
    if scaling == "linear":
        return RopeConfig(theta=theta, rope_type="linear", factor=factor)
    if scaling == "yarn":  # the attention factor derived from `factor`, as transformers does
        return RopeConfig(
            theta=theta,
            rope_type="yarn",
            factor=factor,
            original_max_position_embeddings=f.integer(p + "rope.scaling.original_context_length"),
            beta_fast=f.number(p + "rope.scaling.yarn_beta_fast", 32.0),
            beta_slow=f.number(p + "rope.scaling.yarn_beta_slow", 1.0),
        )
    raise UnsupportedModelError(f"GGUF rope scaling type {scaling!r} is not supported")


def _tensor_values(values: np.ndarray) -> tuple[float, ...]:
    """A GGUF rope tensor's values, which must be positive numbers."""
    flat = np.asarray(values, dtype=np.float64).reshape(-1)
    if not flat.size or not np.all(np.isfinite(flat) & (flat > 0)):
        raise ModelLoadError("GGUF rope factor tensors must hold positive numbers")
    return tuple(float(v) for v in flat)


def _gemma_from_gguf(
    arch: str, f: _Fields, p: str, layers: int, window: int | None, hidden_per_head: int,
    head_dim: int,
) -> dict[str, Any]:  # fmt: skip
    """ModelConfig fields of a Gemma 2 or 3 GGUF, read as llama.cpp reads them
    (src/models/gemma2.cpp, gemma3.cpp), where they differ from config.json's:

    - the converter stores each norm as the 1 + w it is applied as, so nothing is added;
    - a file names no layer types: the layers of `attention.sliding_window_pattern` slide (one
      flag per layer, or every n-th layer global; n is 2 for Gemma 2 and 6 for Gemma 3 without
      the key), the others attend globally; Gemma 2's window is 4096 unless the file says,
      Gemma 3 without a window has only global layers;
    - query_pre_attn_scalar is not stored: the softmax scale is 1/sqrt(head_dim), and
      1/sqrt(hidden / heads) for the 27B models (46 layers of Gemma 2, 62 of Gemma 3), as
      Google's reference has it;
    - sliding layers rotate with `rope.freq_base_swa` (Gemma 3: 10000 without it; Gemma 2: the
      global rope), unscaled;
    - Gemma 2 soft-caps attention scores and final logits (50 and 30 without the keys);
      llama.cpp's Gemma 3 caps the logits only where the file says so.
    """
    gemma2 = arch == "gemma2"
    if gemma2 and not window:
        window = 4096
    swa = [False] * layers
    if window:
        pattern = f.values.get(p + "attention.sliding_window_pattern")
        if isinstance(pattern, list):
            if len(pattern) != layers or not all(isinstance(v, bool) for v in pattern):
                raise f.invalid(
                    p + "attention.sliding_window_pattern", pattern, f"{layers} booleans"
                )
            swa = list(pattern)
        else:
            n = f.integer(p + "attention.sliding_window_pattern", 2 if gemma2 else 6)
            if n < 0:
                raise f.invalid(p + "attention.sliding_window_pattern", n, "at least 0")
            swa = [n == 0 or i % n < n - 1 for i in range(layers)]
    caps = {}
    for key, name, default in (("attn_logit_softcapping", "attention_softcap", 50.0),
                               ("final_logit_softcapping", "final_softcap", 30.0)):  # fmt: skip
        if gemma2 or name == "final_softcap":
            caps[name] = f.number(p + key, default if gemma2 else 0.0)
            if caps[name] < 0:
                raise f.invalid(p + key, caps[name], "a positive number")
    local = f.number(p + "rope.freq_base_swa", None if gemma2 else 10000.0)
    big = layers == (46 if gemma2 else 62)
    return {
        "sandwich_norms": True,
        "embed_scale": float(np.float32(math.sqrt(f.integer(p + "embedding_length")))),
        "mlp_activation": "gelu_tanh",
        "attention_scale": (hidden_per_head if big else head_dim) ** -0.5,
        "layer_windows": tuple(window if s else 0 for s in swa),
        "rope_local": None if local is None else RopeConfig(theta=local),
        **caps,
    }
