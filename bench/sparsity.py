"""`lamina bench sparsity`: what weight and activation sparsity cost in quality and buy in speed.

- quality: perplexity of the default model on held-out text (the end of pydoc's topics; the
  calibration text is their beginning) with int8 weights pruned by Wanda and by magnitude,
  and with activation sparsity, at 0, 25, 40 and 50%, with the decode speed at each point;
- speed: decode tok/s of the random 1.1B model (bandwidth-bound), dense int8 against 50%
  weight-sparse and 40% activation-sparse int8, measured in the same run;
- int4: the same two tables for 4-bit weights with activation sparsity (groups of
  INT4_GROUP, embedding and head int8): perplexity on the default model, and decode of the
  random 1.1B model against llama.cpp's Q4_K_M and Q4_0 of the same weights, interleaved.
"""

from __future__ import annotations

import statistics

from bench.run import resolve_model

LEVELS = (0.25, 0.4, 0.5)
EVAL_CHARS = 10000  # about 2500 tokens
EVAL_CONTEXT = 1024
SPEED_MODEL = "random:llama-1b"
GEN_TOKENS = 32


def held_out_text() -> str:
    """The end of pydoc's topics: calibration reads (far less than) their beginning."""
    from engine.quant.calibration import default_calibration_text

    return default_calibration_text()[-EVAL_CHARS:]


def decode_tok_s(llm, runs: int) -> float:
    from engine import SamplingParams

    params = SamplingParams(max_tokens=GEN_TOKENS, temperature=0, ignore_eos=True)
    prompt = list(range(100, 116))
    llm.generate(prompt, SamplingParams(max_tokens=2))  # warm-up
    speeds = []
    for _ in range(runs):
        m = llm.generate(prompt, params)[0].metrics
        speeds.append((m.generated_tokens - 1) / (m.total_s - m.ttft_s))
    return statistics.median(speeds)


def _calibrate(path, tokens: int, gram: bool) -> dict:
    """Calibration statistics of the float model, shared by every plan tried on it."""
    from engine.loader.model_loader import load_model
    from engine.quant.calibration import collect_input_stats, default_calibration_text

    return collect_input_stats(load_model(path), default_calibration_text(), tokens, gram=gram)


def _variant(path, plan, stats: dict):
    """An LLM with the float model at `path` pruned and quantized by `plan` (None: dense int8)."""
    from engine import LLM
    from engine.quant.sparsify import sparsify

    if plan is None:
        return LLM(path, quant="int8")
    llm = LLM(path)
    sparsify(llm.loaded, plan, stats)
    return llm


def _plans():
    from engine.quant.sparsify import SparsityPlan

    yield "dense", 0.0, None
    for level in LEVELS:
        yield "wanda", level, SparsityPlan(sparsity=level, method="wanda")
        yield "activation", level, SparsityPlan(activation_sparsity=level)
    yield "magnitude", 0.5, SparsityPlan(sparsity=0.5, method="magnitude")
    yield "wanda-2:4", 0.5, SparsityPlan(sparsity=0.5, method="wanda", pattern="2:4")
    yield "wanda+reconstruct", 0.5, SparsityPlan(sparsity=0.5, method="wanda", reconstruct=True)


def quality_table(runs: int) -> list[dict]:
    path = resolve_model(None)
    rows = []
    text = held_out_text()
    stats = _calibrate(path, 4096, gram=True)
    for kind, level, plan in _plans():
        llm = _variant(path, plan, stats)
        ppl = llm.perplexity(text, context=EVAL_CONTEXT, stride=EVAL_CONTEXT // 2)
        rows.append(
            {
                "kind": kind,
                "sparsity": level,
                "perplexity": ppl.perplexity,
                "decode_tok_s": decode_tok_s(llm, runs),
                "weights_mb": llm.loaded.weights.nbytes / 2**20,
            }
        )
    dense = rows[0]
    for row in rows:
        row["perplexity_vs_dense"] = row["perplexity"] / dense["perplexity"]
        row["decode_vs_dense"] = row["decode_tok_s"] / dense["decode_tok_s"]
    return rows


def speed_table(runs: int) -> dict:
    from engine.quant.sparsify import SparsityPlan

    path = resolve_model(SPEED_MODEL)
    variants = {
        "dense_int8": None,
        "weight_sparse_50": SparsityPlan(sparsity=0.5, method="magnitude"),
        "activation_sparse_40": SparsityPlan(activation_sparsity=0.4),
    }
    result = {"model": SPEED_MODEL}
    stats = _calibrate(path, 512, gram=False)
    for name, plan in variants.items():
        llm = _variant(path, plan, stats)
        result[f"{name}_decode_tok_s"] = decode_tok_s(llm, runs)
        result[f"{name}_weights_mb"] = llm.loaded.weights.nbytes / 2**20
        del llm
    for name in ("weight_sparse_50", "activation_sparse_40"):
        result[f"{name}_vs_dense"] = (
            result[f"{name}_decode_tok_s"] / result["dense_int8_decode_tok_s"]
        )
    return result


INT4_GROUP = 128
PEER_TYPES = ("Q4_K_M", "Q4_0")


def _int4_variant(path, level: float, tokens: int):
    """The float model at `path` at int4 (groups of INT4_GROUP, embedding and head int8),
    with `level` activation sparsity (thresholds from `tokens` calibration tokens) if > 0."""
    from bench.perplexity_peer import HEAD
    from engine import LLM
    from engine.quant.formats import WeightPlan, convert_weights, parse_layer_weights
    from engine.quant.sparsify import SparsityPlan, quantize_skipping

    plan = WeightPlan("int4", INT4_GROUP, parse_layer_weights([HEAD]))
    llm = LLM(path, quant="f32", kv_cache_mb=1024)
    if level == 0:
        convert_weights(llm.loaded.weights, plan)
    else:
        skipping = SparsityPlan(activation_sparsity=level, calibration_tokens=tokens)
        quantize_skipping(llm.loaded, plan, skipping, "rtn")
    return llm


def quality_table_int4(runs: int) -> list[dict]:
    """Perplexity and decode speed of the default model at int4, dense and at each level."""
    path = resolve_model(None)
    text = held_out_text()
    rows = []
    for level in (0.0, *LEVELS):
        llm = _int4_variant(path, level, 4096)
        ppl = llm.perplexity(text, context=EVAL_CONTEXT, stride=EVAL_CONTEXT // 2)
        rows.append({"kind": f"int4-g{INT4_GROUP}", "activation_sparsity": level,
                     "perplexity": ppl.perplexity, "decode_tok_s": decode_tok_s(llm, runs)})  # fmt: skip
    for row in rows:
        row["perplexity_vs_dense"] = row["perplexity"] / rows[0]["perplexity"]
        row["decode_vs_dense"] = row["decode_tok_s"] / rows[0]["decode_tok_s"]
    return rows


def speed_table_int4(runs: int, level: float = 0.4) -> dict:
    """Decode of the random 1.1B model (16-token prompt, GEN_TOKENS generated): lamina's
    int4 dense and activation-sparse against llama.cpp's Q4_K_M and Q4_0 of the same
    weights (llama-bench tg at the same context), in interleaved rounds; medians."""
    import numba

    from bench.llama_cpp import build_tools, llama_bench
    from bench.peers import gguf_of_type
    from bench.run import _gguf_cache

    path = resolve_model(SPEED_MODEL)
    tools, threads = build_tools(), numba.config.NUMBA_NUM_THREADS
    ggufs = {q: gguf_of_type(path, q, _gguf_cache(path)) for q in PEER_TYPES}
    llms = {"int4": _int4_variant(path, 0.0, 0),
            f"int4_activation_sparse_{round(level * 100)}": _int4_variant(path, level, 512)}  # fmt: skip
    samples: dict[str, list[float]] = {name: [] for name in [*llms, *ggufs]}
    for _ in range(runs):
        for name, llm in llms.items():
            samples[name].append(decode_tok_s(llm, 1))
        for qtype, gguf in ggufs.items():
            figures = llama_bench(tools, gguf, threads, 16, GEN_TOKENS, reps=1)
            samples[qtype].extend(figures["decode_samples_tok_s"])
    result = {"model": SPEED_MODEL, "group": INT4_GROUP, "activation_sparsity": level,
              "rounds": runs}  # fmt: skip
    for name, values in samples.items():
        result[f"{name}_decode_tok_s"] = statistics.median(values)
    for name, llm in llms.items():
        result[f"{name}_weights_mb"] = llm.loaded.weights.nbytes / 2**20
        for qtype in PEER_TYPES:
            ratio = result[f"{name}_decode_tok_s"] / result[f"{qtype}_decode_tok_s"]
            result[f"{name}_vs_llama.cpp_{qtype}"] = ratio
    return result
