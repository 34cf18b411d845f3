"""A warm decode step allocates nothing per layer: every activation lives in the runner's
workspace, allocated once for max_num_batched_tokens tokens.

Two independent counts: numpy's allocations through tracemalloc (numpy reports its data
buffers to it), and numba's own allocations inside kernels through its runtime statistics
(only on when NUMBA_NRT_STATS=1 is set before numba loads, hence a subprocess).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import tracemalloc

import pytest
import torch
import transformers

from engine import LLM
from tests.tiny_models import VOCAB

HIDDEN, INTERMEDIATE = 256, 4096  # gate_up is 32 KiB a token: a per-layer copy would show


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory, hf_tokenizer):
    folder = tmp_path_factory.mktemp("workspace") / "wide"
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    hf_tokenizer.save_pretrained(folder)
    return folder


def decode_steps(llm: LLM, steps: int):
    """Prefill a sequence, then yield around each decode pass of the runner."""
    runner, cache = llm.engine_loop.runner, llm.engine_loop.cache
    cache.add_sequence("probe", [])
    prompt = [5, 6, 7, 8, 9]
    logits = runner.run([("probe", prompt)])
    cache.commit("probe", prompt)
    token = int(logits[0].argmax())
    try:
        for _ in range(steps):
            yield lambda: runner.run([("probe", [token])])
            cache.commit("probe", [token])
    finally:
        cache.free("probe")


@pytest.mark.parametrize("quant", [None, "int8"])
def test_warm_decode_step_allocates_no_activation(wide_model, quant):
    llm = LLM(wide_model, quant=quant, kv_cache_mb=2, max_num_seqs=4, max_num_batched_tokens=64)
    per_token = 4 * min(HIDDEN, INTERMEDIATE)  # the smallest activation of one token
    tracemalloc.start()
    try:
        peaks = []
        for run in decode_steps(llm, 4):
            run()  # the first decode passes warm up lazily created state
            before = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            logits = run()
            peaks.append(tracemalloc.get_traced_memory()[1] - before)
            assert logits.shape == (1, VOCAB)
    finally:
        tracemalloc.stop()
    # Small Python objects and the pass's few index arrays only: no activation, not even one
    # token's hidden state, let alone one per layer.
    assert max(peaks) < per_token, peaks


_NRT_SCRIPT = """
import json, sys
from numba.core.runtime import rtsys
from engine import LLM
from tests.test_workspace import decode_steps

llm = LLM(sys.argv[1], quant=sys.argv[2] or None, kv_cache_mb=2, max_num_seqs=4,
          max_num_batched_tokens=64)
counts = []
for run in decode_steps(llm, 3):
    run()
    before = rtsys.get_allocation_stats().alloc
    run()
    counts.append(rtsys.get_allocation_stats().alloc - before)
print(json.dumps(counts))
"""


@pytest.mark.parametrize("quant", ["", "int8"])
def test_warm_decode_step_makes_no_numba_allocation(wide_model, quant):
    env = {**os.environ, "NUMBA_NRT_STATS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_NRT_SCRIPT), str(wide_model), quant],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        cwd=os.path.dirname(os.path.dirname(__file__)),
    ).stdout
    assert json.loads(out.strip().splitlines()[-1]) == [0, 0, 0]
