"""Perplexity against transformers: the Hugging Face guide's sliding windows, and
llama-perplexity's half-chunk scheme written out on transformers' logits."""

from __future__ import annotations

import math
from pydoc_data.topics import topics

import pytest
import torch

from engine import LLM
from engine.cli import main
from tests.tiny_models import build_tiny_model

TEXT = topics["assignment"][:2500]


def hf_guide_perplexity(model, ids: list[int], context: int, stride: int) -> float:
    """The loop from transformers' perplexity guide: labels = -100 for context tokens."""
    input_ids = torch.tensor([ids])
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + context, len(ids))
        trg_len = end - prev_end
        window = input_ids[:, begin:end]
        labels = window.clone()
        labels[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(window, labels=labels).loss
        # the loss averages over the shifted labels; the guide's "valid - 1" is exact only for
        # the first window, so count the shifted labels themselves
        valid = int((labels[:, 1:] != -100).sum())
        nll_sum += float(loss) * valid
        n_tokens += valid
        prev_end = end
        if end == len(ids):
            break
    return math.exp(nll_sum / n_tokens)


@pytest.mark.parametrize(("context", "stride"), [(64, 32), (64, 64), (50, 17)])
def test_matches_transformers_guide(context, stride, tmp_path, hf_tokenizer):
    hf = build_tiny_model("llama-gqa-untied", tmp_path, hf_tokenizer)
    llm = LLM(tmp_path)
    ids = llm.tokenizer.encode(TEXT)[:200]
    ours = llm.perplexity(llm.tokenizer.decode(ids), context, stride)
    ref = hf_guide_perplexity(hf, llm.tokenizer.encode(llm.tokenizer.decode(ids)), context, stride)
    assert ours.perplexity == pytest.approx(ref, rel=1e-4)


def half_chunk_perplexity(model, ids: list[int], context: int, chunks: int) -> float:
    """llama-perplexity's loop (perplexity.cpp): chunk c of `context` tokens scores tokens
    first + 1 .. context - 1 from the logits at first .. context - 2, first = context / 2."""
    nll, count = 0.0, 0
    for c in range(chunks):
        window = torch.tensor([ids[c * context : (c + 1) * context]])
        with torch.no_grad():
            logits = model(window).logits[0].double()
        log_probs = torch.log_softmax(logits, dim=-1)
        for j in range(context // 2, context - 1):
            nll -= float(log_probs[j, window[0, j + 1]])
            count += 1
    return math.exp(nll / count)


def test_half_chunks_match_llama_perplexity_scheme(tmp_path, hf_tokenizer):
    hf = build_tiny_model("llama-gqa-untied", tmp_path, hf_tokenizer)
    llm = LLM(tmp_path)
    ids = llm.tokenizer.encode(TEXT)
    ours = llm.perplexity(TEXT, context=64, chunks=3)
    assert ours.windows == 3 and ours.scored_tokens == 3 * 31
    assert ours.perplexity == pytest.approx(half_chunk_perplexity(hf, ids, 64, 3), rel=1e-4)


def test_int8_perplexity_within_one_percent_of_float32(default_llm):
    int8 = LLM(quant="int8")
    f32 = default_llm.perplexity(TEXT, context=256, stride=128).perplexity
    q8 = int8.perplexity(TEXT, context=256, stride=128).perplexity
    assert abs(q8 - f32) / f32 < 0.01, (q8, f32)


def test_cli_perplexity_json(tmp_path, capsys, hf_tokenizer):
    build_tiny_model("qwen2-bias-tied", tmp_path / "m", hf_tokenizer)
    text = tmp_path / "t.txt"
    text.write_text(TEXT[:600])
    assert (
        main(["perplexity", "-m", str(tmp_path / "m"), "--context", "64", "--json", str(text)]) == 0
    )
    import json

    result = json.loads(capsys.readouterr().out)
    assert result["perplexity"] > 1 and result["scored_tokens"] > 0


def test_cli_perplexity_missing_file_exits_2(capsys):
    assert main(["perplexity", "/no/such/file.txt"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_window_as_long_as_the_context(tmp_path, hf_tokenizer):
    """Scoring needs no free position: a window may fill the whole context window."""
    hf = build_tiny_model("llama-gqa-untied", tmp_path, hf_tokenizer)
    llm = LLM(tmp_path, max_model_len=64)
    ids = llm.tokenizer.encode(TEXT)[:150]
    text = llm.tokenizer.decode(ids)
    ours = llm.perplexity(text, context=1024).perplexity  # capped at 64
    ref = hf_guide_perplexity(hf, llm.tokenizer.encode(text), 64, 32)
    assert ours == pytest.approx(ref, rel=1e-4)
