"""Which precision each matrix gets when a model is converted, on load or by `lamina quantize`.

`--quant int8|int4|f32` converts every matrix; `lamina quantize --layer-weights KEY=FORMAT`
overrides it per matrix, as llama.cpp's Q4_K_M keeps its output head and some layers at a
higher precision. KEY is `embed`, `lm_head`, a linear name (qkv, o_proj, gate_up, down; an
expert's gate_up and down go by those names), a layer index, or INDEX.NAME; the most specific
key wins.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from engine.errors import InvalidInputError
from engine.weights import LAYER_LINEARS, DenseWeight, ModelWeights, Weight

WEIGHT_FORMATS = ("f32", "int8", "int4")
GROUP_SIZES = (32, 64, 128)
# A quantizer gets each float matrix with its name: "embed", "lm_head" or "layers.N.NAME".
Quantizer = Callable[[DenseWeight, str], Weight]


@dataclass(frozen=True)
class WeightPlan:
    """The precision of each matrix: `default` unless `overrides` names it (None: as
    loaded); `group_size` is the int4 group."""

    default: str | None = None
    group_size: int = 32
    overrides: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for value in (self.default, *self.overrides.values()):
            if value is not None and value not in WEIGHT_FORMATS:
                raise InvalidInputError(
                    f"unknown quantization {value!r}; choose from {', '.join(WEIGHT_FORMATS)}"
                )
        if self.group_size not in GROUP_SIZES:
            raise InvalidInputError(
                f"group size {self.group_size} is not one of {', '.join(map(str, GROUP_SIZES))}"
            )
        for key in self.overrides:
            if not _valid_key(key):
                raise InvalidInputError(
                    f"layer weights key {key!r} is not embed, lm_head, a linear name "
                    f"({', '.join(LAYER_LINEARS)}), a layer index, or INDEX.NAME"
                )

    def format_for(self, name: str) -> str | None:
        """The format of matrix `name` ("embed", "lm_head" or "layers.N.NAME")."""
        keys = [name]
        if name.startswith("layers."):  # an expert's matrices go by their linear's name
            parts = name.split(".")
            index, linear = parts[1], parts[-1]
            keys = [f"{index}.{linear}", index, linear]
        for key in keys:
            if key in self.overrides:
                return self.overrides[key]
        return self.default

    def unties(self) -> bool:
        """Whether tied embeddings need their own output head: the plan stores the two at
        different precisions."""
        return self.format_for("embed") != self.format_for("lm_head")

    def makes(self, fmt: str) -> bool:
        """Whether any matrix gets format `fmt`."""
        return fmt in (self.default, *self.overrides.values())

    def check_layers(self, num_layers: int) -> None:
        """Refuse overrides naming a layer the model does not have."""
        for key in self.overrides:
            index = key.partition(".")[0]
            if index.isdigit() and int(index) >= num_layers:
                raise InvalidInputError(
                    f"layer weights key {key!r}: the model has layers 0 to {num_layers - 1}"
                )

    def quantizer(self) -> Quantizer | None:
        """The per-matrix transform (None: keep every matrix as loaded)."""
        if self.default is None and not self.overrides:
            return None
        return self._convert

    def _convert(self, weight: DenseWeight, name: str) -> Weight:
        fmt = self.format_for(name)
        if fmt == "int8":
            from engine.quant.int8 import quantize_int8

            return quantize_int8(weight)
        if fmt == "int4":
            from engine.quant.int4 import quantize_int4

            return quantize_int4(weight, self.group_size)
        return weight


def convert_weights(
    weights: ModelWeights,
    plan: WeightPlan,
    linear: Callable[[DenseWeight, int, str], Weight | None] | None = None,
) -> None:
    """Convert every float matrix of `weights` in place as `plan` says. `linear(weight, i,
    name)`, when given, converts decoder linear `name` of layer i instead (None: as `plan`
    says), so that a calibrated method can take the ones it handles."""
    convert = plan.quantizer() or (lambda w, name: w)
    for i, layer in enumerate(weights.layers):
        for name, weight in layer.linears():
            done = linear(weight, i, name) if linear else None
            layer.set_linear(
                name, done if done is not None else convert(weight, f"layers.{i}.{name}")
            )
    table, head = weights.embed, weights.lm_head
    weights.embed = convert(table, "embed")
    tied = head is table and not plan.unties()
    weights.lm_head = weights.embed if tied else convert(head, "lm_head")


def _valid_key(key: str) -> bool:
    if key in ("embed", "lm_head"):
        return True
    index, _, name = key.partition(".")
    canonical = index.isdigit() and str(int(index)) == index  # "3", not "03"
    if not name:
        return key in LAYER_LINEARS or canonical
    return canonical and name in LAYER_LINEARS


def parse_layer_weights(items: list[str]) -> dict[str, str]:
    """`--layer-weights KEY=FORMAT` items (repeatable, or comma-separated) as a mapping."""
    overrides = {}
    for item in (part for entry in items for part in entry.split(",") if part):
        key, sep, value = item.partition("=")
        if not sep:
            raise InvalidInputError(f"--layer-weights takes KEY=FORMAT, got {item!r}")
        overrides[key.strip()] = value.strip()
    return overrides
