"""Quality against llama.cpp: perplexity of the same quantized files, and of lamina's 4-bit.

Every GGUF row runs in lamina (in the file's own quantization) and in `llama-perplexity`,
on the same text with the same scheme (chunks of 512 tokens, each scoring its second
half). The text is the second half of pydoc's topics; the first half calibrates GPTQ, so
no row is scored on text it was tuned on. lamina's own int4 rows (round-to-nearest and GPTQ,
groups of 32 and 64, from the default model dequantized; the tied head at int8) sit beside llama.cpp's Q4_0 and
Q4_K_M made by llama-quantize from the same weights.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from bench.llama_cpp import build_tools, llama_perplexity, quantize
from engine.loader.default_model import default_model_path
from kernels_cpu.jit_cache import cache_dir

CONTEXT = 512
CHUNKS = 20
PEER_TYPES = ("Q4_0", "Q4_K_M", "Q8_0")
# The tied embedding and output head at int8, as Q4_K_M keeps them at 6 bits.
HEAD = "embed=int8,lm_head=int8"


def _texts(folder: Path) -> tuple[Path, Path]:
    """(calibration, evaluation) halves of pydoc's topics, written to `folder`."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    half = len(names) // 2
    paths = []
    for part, chosen in (("calibration", names[:half]), ("evaluation", names[half:])):
        path = folder / f"{part}.txt"
        path.write_text("\n\n".join(topics[n] for n in chosen), encoding="utf-8")
        paths.append(path)
    return paths[0], paths[1]


def _lamina_ppl(model: Path | str, text: Path, quant: str | None = None) -> float:
    from engine import LLM

    llm = LLM(model, quant=quant)
    return llm.perplexity(text.read_text(), context=CONTEXT, chunks=CHUNKS).perplexity


def perplexity_table() -> list[dict]:
    """One row per weight format of the default model: lamina's and llama.cpp's perplexity."""
    from engine.cli import main

    tools = build_tools()
    source = default_model_path()
    cache = cache_dir() / f"gguf-{source.stem}"
    cache.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        calibration, evaluation = _texts(Path(tmp))
        files = {"as shipped": source}
        for qtype in PEER_TYPES:
            files[qtype] = quantize(tools, source, qtype, cache / f"{source.stem}-{qtype}.gguf")
        for label, path in files.items():
            ours = _lamina_ppl(path, evaluation)
            theirs = llama_perplexity(tools, path, evaluation, CONTEXT, CHUNKS)
            rows.append({"weights": f"{path.name} ({label})", "lamina_ppl": ours,
                         "llama.cpp_ppl": theirs, "ratio": ours / theirs})  # fmt: skip
        rows.append({"weights": "f32 (default model dequantized)",
                     "lamina_ppl": _lamina_ppl(source, evaluation, "f32")})  # fmt: skip
        for group in (32, 64):
            for method in ("rtn", "gptq"):
                out = Path(tmp) / f"int4-g{group}-{method}"
                args = ["quantize", str(source), str(out), "--weights", "int4", "--group-size",
                        str(group), "--method", method, "--layer-weights", HEAD]  # fmt: skip
                if method == "gptq":
                    args += ["--calibration", str(calibration)]
                if main(args) != 0:
                    raise RuntimeError(f"lamina {' '.join(args)} failed")
                rows.append({"weights": f"lamina int4 g{group} {method}",
                             "lamina_ppl": _lamina_ppl(out, evaluation)})  # fmt: skip
    reference = next(r["llama.cpp_ppl"] for r in rows if "Q4_K_M" in r["weights"])
    for row in rows:
        row["vs_llama.cpp_Q4_K_M"] = row["lamina_ppl"] / reference
        row["context"], row["chunks"] = CONTEXT, CHUNKS
    return rows
