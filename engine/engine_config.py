"""EngineConfig: every setting of an engine, defined once.

`LLM(**kwargs)`, the CLI's model flags and the server all build this one frozen dataclass.
Each field carries its help text (and, where the command line needs one, how a flag's text
becomes a value) in its metadata: the CLI derives its flags from here, and the checks run
in `__post_init__`, where the input enters, raising InvalidInputError.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from engine.backends.device import DEVICES
from engine.errors import InvalidInputError
from engine.kv_cache import DEFAULT_KV_FRACTION, KV_DTYPES
from engine.quant.formats import WEIGHT_FORMATS
from engine.speculative import METHODS, SpeculativeConfig
from offload.placement import parse_memory_size

DEFAULT_MAX_NUM_SEQS = 64
# Tokens per forward pass. Prefill throughput on 2-8 cores is flat beyond a few hundred tokens,
# and a bounded step keeps the decode latency of the other sequences bounded too.
DEFAULT_MAX_NUM_BATCHED_TOKENS = 512
QUANTS = WEIGHT_FORMATS


def memory_size(value: int | str) -> int:
    """A budget as a size string ("512M", "2G", "700" MiB) or a positive int of bytes."""
    if isinstance(value, str):
        try:
            return parse_memory_size(value)
        except ValueError as exc:
            raise InvalidInputError(str(exc)) from None
    return value


def _option(
    help: str, parse: Callable[[str], Any] | None = None, choices: tuple[str, ...] = ()
) -> dict[str, Any]:
    return {"help": help, "parse": parse, "choices": choices}


@dataclass(frozen=True)
class EngineConfig:
    """One engine's settings: the model, its cache, the scheduler and the devices."""

    model: str | None = field(
        default=None,
        metadata=_option("HF folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)"),
    )
    quant: str | None = field(
        default=None,
        metadata=_option(
            "weight precision, converted while loading (default: a GGUF runs in its own "
            "quantization, a float checkpoint in f32)",
            None,
            QUANTS,
        ),
    )
    max_model_len: int | None = field(
        default=None, metadata=_option("cap the context window (default: the model's)", int)
    )
    threads: int | None = field(
        default=None,
        metadata=_option(
            "CPU threads for the kernels (default: the cores other busy processes leave "
            "free, measured every 0.1 s: every parallel kernel waits for its slowest "
            "thread, and a thread sharing a core with a busy process is slow)",
            int,
        ),
    )
    device: str = field(
        default="auto",
        metadata=_option("auto: a CUDA GPU when numba finds one, else the CPU", None, DEVICES),
    )
    kv_cache_mb: float | None = field(
        default=None,
        metadata=_option(
            "KV cache size in MB (default: kv_cache_fraction of the free RAM or GPU memory); "
            "it must hold one max_model_len context",
            float,
        ),
    )
    kv_cache_fraction: float | None = field(
        default=None,
        metadata=_option(
            f"share of the free memory the KV cache takes (default: {DEFAULT_KV_FRACTION})", float
        ),
    )
    kv_cache_dtype: str = field(
        default="float32",
        metadata=_option("int8 holds about 4x the tokens in the same memory", None, KV_DTYPES),
    )
    enable_prefix_caching: bool = field(
        default=True,
        metadata=_option("reuse the cached keys and values of a repeated prompt prefix"),
    )
    max_num_seqs: int = field(
        default=DEFAULT_MAX_NUM_SEQS,
        metadata=_option("sequences decoded together (continuous batching)", int),
    )
    max_num_batched_tokens: int = field(
        default=DEFAULT_MAX_NUM_BATCHED_TOKENS,
        metadata=_option("tokens per forward pass, also the prefill chunk size", int),
    )
    cpu_memory: int | None = field(
        default=None,
        metadata=_option(
            "RAM budget for weights, KV cache and activations: 512M, 2G, 700 (MiB), or an int "
            "of bytes; layers beyond it stream from disk (lamina checkpoints; default: the "
            "available RAM less a margin, for checkpoints)",
            parse_memory_size,
        ),
    )
    gpu_memory: int | None = field(
        default=None,
        metadata=_option(
            "GPU budget with device cuda (default: free GPU memory less a margin); layers "
            "beyond it are copied in from RAM while others compute",
            parse_memory_size,
        ),
    )
    drop_page_cache: bool = field(
        default=False,
        metadata=_option("drop streamed layers from the OS page cache after reading them"),
    )
    # Speculative decoding ({"method": "ngram", "num_speculative_tokens": 4, ...}, vLLM's
    # speculative_config): its flags are SpeculativeConfig's fields (`_SPECULATIVE_FLAGS`).
    speculative: SpeculativeConfig | None = field(
        default=None, metadata={**_option("speculative decoding"), "flag": False}
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "speculative", SpeculativeConfig.of(self.speculative))
        for name in ("cpu_memory", "gpu_memory"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _positive(name, memory_size(value)))
        if self.model is not None:
            object.__setattr__(self, "model", str(self.model))
        for name in ("quant", "device", "kv_cache_dtype"):
            choices = _field(name).metadata["choices"]
            value = getattr(self, name)
            if value is not None and value not in choices:
                raise InvalidInputError(
                    f"{name} must be one of {', '.join(choices)}, got {value!r}"
                )
        for name in ("max_model_len", "threads", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name))
        if self.max_model_len is not None and self.max_model_len < 2:
            raise InvalidInputError(f"max_model_len must be at least 2, got {self.max_model_len}")
        if self.threads is not None:
            import numba

            if self.threads > numba.config.NUMBA_NUM_THREADS:
                raise InvalidInputError(
                    f"threads must be between 1 and {numba.config.NUMBA_NUM_THREADS}, "
                    f"got {self.threads}"
                )
        if self.kv_cache_mb is not None:
            _positive("kv_cache_mb", self.kv_cache_mb, integer=False)
        if self.kv_cache_fraction is not None:
            _number("kv_cache_fraction", self.kv_cache_fraction, integer=False)
            if not 0 < self.kv_cache_fraction <= 1:
                raise InvalidInputError(
                    f"kv_cache_fraction must be in (0, 1], got {self.kv_cache_fraction}"
                )
        for name in ("enable_prefix_caching", "drop_page_cache"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidInputError(
                    f"{name} must be true or false, got {getattr(self, name)!r}"
                )
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise InvalidInputError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least "
                f"max_num_seqs ({self.max_num_seqs}), so every running sequence can decode each step"
            )

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineConfig:
        """The config of `LLM(**kwargs)`: an unknown name is a user error naming the known."""
        unknown = sorted(kwargs.keys() - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            known = ", ".join(f.name for f in dataclasses.fields(cls))
            raise InvalidInputError(f"unknown engine setting {unknown[0]!r}; known: {known}")
        return cls(**kwargs)

    @classmethod
    def add_cli_args(
        cls, parser: argparse.ArgumentParser, names: tuple[str, ...] | None = None
    ) -> None:
        """One flag per field (or per field in `names`): --max-num-seqs N,
        --no-enable-prefix-caching, ..., defaulting to the field's default."""
        for f in dataclasses.fields(cls):
            if names is not None and f.name not in names:
                continue
            if not f.metadata.get("flag", True):
                continue
            meta, flag = f.metadata, "--" + f.name.replace("_", "-")
            shown = meta["help"]  # a None default is explained there
            if f.default is not None:
                shown += f" (default: {str(f.default).lower()})"
            shown = shown.replace("%", "%%")
            if f.type == "bool":
                parser.add_argument(
                    flag, action=argparse.BooleanOptionalAction, default=f.default, help=shown
                )
                continue
            names_ = [flag, "-m"] if f.name == "model" else [flag]
            parse = meta["parse"]
            parser.add_argument(
                *names_,
                type=_cli_type(f.name, parse) if parse else None,
                choices=meta["choices"] or None,
                default=f.default,
                metavar=None if meta["choices"] else _metavar(f.name, parse),
                help=shown,
            )

        if names is None or "speculative" in names:
            group = parser.add_argument_group("speculative decoding")
            group.add_argument(
                "--speculative-method",
                choices=METHODS,
                help="propose tokens and verify them in one pass (ngram: prompt lookup; "
                "draft: --draft-model; self: the model's first layers or another precision)",
            )
            for name, (help, parse) in _SPECULATIVE_FLAGS.items():
                default = SpeculativeConfig.__dataclass_fields__[name].default
                options: dict[str, Any] = {"help": f"{help} (default: {default})"}
                if parse is int:
                    options.update(type=_cli_type(name, int), metavar="N")
                elif name == "draft_quant":
                    options.update(choices=QUANTS)
                else:
                    options.update(metavar="PATH")
                group.add_argument("--" + name.replace("_", "-"), **options)

    @classmethod
    def from_cli(cls, args: argparse.Namespace) -> EngineConfig:
        """The config of the flags `add_cli_args` added."""
        values = {
            f.name: getattr(args, f.name)
            for f in dataclasses.fields(cls)
            if f.metadata.get("flag", True)
        }
        values["speculative"] = speculative_from_cli(args)
        return cls(**values)


def speculative_from_cli(args: argparse.Namespace) -> dict[str, Any] | None:
    """The speculative settings of the flags `add_cli_args` added (None: no method)."""
    method = getattr(args, "speculative_method", None)
    given = {n: getattr(args, n, None) for n in _SPECULATIVE_FLAGS}
    given = {n: v for n, v in given.items() if v is not None}
    if method is None and given:
        raise InvalidInputError(
            f"--{next(iter(given)).replace('_', '-')} needs --speculative-method"
        )
    return None if method is None else {"method": method, **given}


# SpeculativeConfig's fields that are flags, besides the method.
_SPECULATIVE_FLAGS: dict[str, tuple[str, type]] = {
    "num_speculative_tokens": ("tokens proposed per step, at most (each sequence adapts)", int),
    "prompt_lookup_min": ("shortest suffix ngram looks up", int),
    "prompt_lookup_max": ("longest suffix ngram looks up", int),
    "draft_model": ("the draft model (method draft), with the target's vocabulary", str),
    "draft_quant": ("the draft's weight precision (draft, self)", str),
    "draft_layers": ("run only the draft's first N layers (self: default half)", int),
}


def _field(name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(EngineConfig) if f.name == name)


def _metavar(name: str, parse: Callable[[str], Any] | None) -> str:
    return "PATH" if name == "model" else {int: "N", float: "X"}.get(parse, "SIZE")


def _cli_type(name: str, parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """argparse names a type function in its errors: name it after the flag's kind."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            kind = {int: "an integer", float: "a number"}.get(parse)
            message = str(exc) if kind is None else f"expected {kind}, got {text!r}"
            raise argparse.ArgumentTypeError(message) from None

    convert.__name__ = name
    return convert


def _number(name: str, value: Any, integer: bool) -> None:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        kind = "an integer" if integer else "a number"
        raise InvalidInputError(f"{name} must be {kind}, got {value!r}")
    if not math.isfinite(value):
        raise InvalidInputError(f"{name} must be finite, got {value!r}")


def _positive(name: str, value: Any, integer: bool = True) -> Any:
    _number(name, value, integer)
    if value <= 0:
        raise InvalidInputError(f"{name} must be positive, got {value!r}")
    return value
