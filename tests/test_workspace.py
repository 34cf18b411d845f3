"""A warm decode step allocates nothing per layer: every activation lives in the runner's
workspace, allocated once for max_num_batched_tokens tokens.

Two independent counts: numpy's allocations through tracemalloc (numpy reports its data
buffers to it), and numba's runtime statistics for allocations inside kernels, which
tracemalloc does not see (only on when NUMBA_NRT_STATS=1 is set before numba loads, hence
a subprocess).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import tracemalloc

import numba
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


def passes(llm: LLM, steps: int, tokens: int = 1):
    """Prefill a sequence, then yield a call running a pass of `tokens` new tokens (1: a
    decode step); each pass is run twice at the same positions, then committed."""
    runner, cache = llm.engine_loop.runner, llm.engine_loop.cache
    cache.add_sequence("probe", [])
    prompt = [5, 6, 7, 8, 9]
    logits = runner.run([("probe", prompt)])
    cache.commit("probe", prompt)
    chunk = [int(logits[0].argmax())] * tokens
    try:
        for _ in range(steps):
            yield lambda: runner.run([("probe", chunk)])
            cache.commit("probe", chunk)
    finally:
        cache.free("probe")


def peak_bytes(llm: LLM, tokens: int) -> int:
    """The most memory numpy and Python held at once during a warm pass, above what they
    held before it."""
    tracemalloc.start()
    try:
        peaks = []
        for run in passes(llm, 3, tokens):
            run()  # the first passes of a shape warm up lazily created state
            before = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            assert run().shape == (1, VOCAB)
            peaks.append(tracemalloc.get_traced_memory()[1] - before)
    finally:
        tracemalloc.stop()
    return max(peaks)


@pytest.mark.parametrize("quant", [None, "int8"])
def test_warm_passes_allocate_no_activation(wide_model, quant):
    """A decode step holds less than one MLP activation of one token (32 KiB); a 32-token
    pass less than one token-wide hidden state of it (32 KiB): only small Python objects and
    the pass's index arrays."""
    # A fixed thread count: the default policy looks at the machine's load every 0.1 s,
    # reading /proc through an 8 KiB file buffer, which a pass on a loaded machine may span.
    threads = numba.config.NUMBA_NUM_THREADS
    llm = LLM(
        wide_model,
        quant=quant,
        kv_cache_mb=2,
        max_num_seqs=4,
        max_num_batched_tokens=64,
        threads=threads,
    )
    assert peak_bytes(llm, 1) < 8 * 2**10
    assert peak_bytes(llm, 32) < 32 * 4 * HIDDEN


_NRT_SCRIPT = """
import json, sys
from numba.core.runtime import rtsys
from engine import LLM
from tests.test_workspace import passes

llm = LLM(sys.argv[1], quant=sys.argv[2] or None, kv_cache_mb=2, max_num_seqs=4,
          max_num_batched_tokens=64)
counts = {}
for tokens in (1, 2, 8, 32):
    for run in passes(llm, 2, tokens):
        run()
        before = rtsys.get_allocation_stats().alloc
        run()
        counts.setdefault(tokens, []).append(rtsys.get_allocation_stats().alloc - before)
print(json.dumps(counts))
"""


@pytest.mark.parametrize("quant", ["", "int8"])
def test_numba_allocations_do_not_grow_with_the_work(wide_model, quant):
    """numba counts an allocation for every array handed to a kernel (its reference to the
    buffer), so a pass never counts zero; but kernels that allocate nothing themselves count
    the same whatever the work: for 1 or 2 tokens (decode kernels), for 8 or 32 (prefill
    kernels)."""
    env = {**os.environ, "NUMBA_NRT_STATS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_NRT_SCRIPT), str(wide_model), quant],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        cwd=os.path.dirname(os.path.dirname(__file__)),
    ).stdout
    counts = json.loads(out.strip().splitlines()[-1])
    assert len({*counts["1"], *counts["2"]}) == 1, counts
    assert len({*counts["8"], *counts["32"]}) == 1, counts
