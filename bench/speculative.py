"""`lamina bench speculative`: what n-gram speculation buys, per task, against plain decode.

Plain decode and a speculating engine over the same weights (k = 4; n-gram lookup, and on
chat also the target's 4-bit weights and its first 8 layers as its own draft) take turns run
by run (medians of `runs`), greedy, 128 tokens:
- edit: a ~450-token passage to reproduce with its typos fixed (the output copies spans);
- summarise: the same passage to summarise (copies less);
- chat: free generation on short chat prompts (copies little).
Decode tok/s of one request is (generated - 1) / (total - ttft); the acceptance rate is
accepted / proposed tokens. Both engines must give the same tokens (greedy is lossless),
checked on every run. Then 16 chat requests at once, where speculation turns itself off
(more sequences decode than `max_batch`): aggregate decode tok/s of both engines. Last, where
a draft model pays: the random 1.1B model with a random tiny draft of its vocabulary, whose
proposals are swapped for the target's own greedy tokens with a set probability (the draft
still runs, so its cost is real): the speed-up against the acceptance rate.
"""

from __future__ import annotations

import random
import statistics

PASSAGE = (
    "The river that runs through the old town was once the only road to the sea. Merchants "
    "brought salt, wool and timber down to the harbour on flat boats, and the town grew rich "
    "on the tolls it charged at the stone bridge. In the spring floods the water rose over "
    "the lower streets, and the families who lived there moved their goods to the upper "
    "floors and waited. When the railway arrived the boats stopped coming, the toll house "
    "closed, and the bridge became a place where children fished on summer evenings. Today "
    "the harbour holds a museum, a few sailing boats and a cafe that serves fish caught the "
    "same morning. Visitors walk along the river path from the bridge to the sea in about an "
    "hour, passing the mill, the old warehouses and the gardens that were planted where the "
    "timber yards used to be. The town council keeps the path open all year, and in winter "
    "volunteers clear the fallen branches after every storm. "
) * 2
TYPOS = (
    PASSAGE.replace("merchants", "merchnats")
    .replace("timber", "timbre")
    .replace("harbour", "harbuor")
)
TASKS = {
    "edit": [f"Rewrite this passage exactly, fixing the spelling mistakes:\n\n{TYPOS}"],
    "summarise": [f"Summarise this passage in a few sentences:\n\n{PASSAGE}"],
    "chat": [
        "Tell me a short story about a lighthouse keeper.",
        "What are three good habits for learning a language?",
        "Explain why the sky is blue.",
    ],
}
GEN_TOKENS = 128
DRAFT_TOKENS = 64
DRAFT_AGREEMENTS = (0.0, 0.5, 0.7, 0.85, 0.95, 1.0)
BATCH = 16
METHODS = {
    "ngram": {"method": "ngram", "num_speculative_tokens": 4},
    # The target's weights in 4 bits as its own draft, and its first 8 layers.
    "self-int4": {"method": "self", "draft_quant": "int4", "num_speculative_tokens": 4},
    "self-8-layers": {"method": "self", "draft_layers": 8, "num_speculative_tokens": 4},
}
TASK_METHODS = {
    "edit": ("ngram",),
    "summarise": ("ngram",),
    "chat": ("ngram", "self-int4", "self-8-layers"),
}


def run_speculative(model: str | None, quant: str | None, runs: int) -> list[dict]:
    from engine import LLM, SamplingParams

    plain = LLM(model, quant=quant, max_model_len=2048)
    engines = {name: LLM(model, quant=quant, max_model_len=2048, speculative=spec)
               for name, spec in METHODS.items()}  # fmt: skip
    params = SamplingParams(max_tokens=GEN_TOKENS, temperature=0)
    rows = []
    for task, methods in TASK_METHODS.items():
        ids = [plain.encode_chat([{"role": "user", "content": p}])[1] for p in TASKS[task]]
        for method in methods:
            rows.append(_task_row(task, method, plain, engines[method], ids, params, runs))
    rows.append(_batch_row(plain, engines["ngram"], runs))
    for llm in (plain, *engines.values()):
        llm.close()
    rows.extend(_draft_curve(runs))
    return rows


class _OracleDraft:
    """A draft whose agreement with the target is set: each proposal is the target's own
    greedy continuation, each token swapped for another with probability 1 - `agreement`;
    the real draft model still runs its passes for every proposal, so its cost is paid."""

    def __init__(self, real, reference: list[int], prompt_len: int, agreement: float) -> None:
        self.real, self.reference, self.prompt_len = real, reference, prompt_len
        self.agreement = agreement
        self.rng = random.Random(0)

    def propose(self, requests):
        self.real.propose(requests)  # the draft model's cost
        out = []
        for seq, k in requests:
            at = len(seq.tokens) - self.prompt_len
            tokens = self.reference[at : at + k]
            out.append([t if self.rng.random() < self.agreement else (t + 1) % 49152
                        for t in tokens])  # fmt: skip
        return out

    def release(self, live):
        self.real.release(live)

    def close(self):
        self.real.close()


def _draft_curve(runs: int) -> list[dict]:
    """Random 1.1B target (int8), random tiny draft of its vocabulary (hidden 256, 4 layers,
    int8): the speed-up as a function of how often the draft agrees, set by `_OracleDraft`."""
    from bench.random_model import random_model_path
    from engine import LLM, SamplingParams

    target_path = random_model_path("random:llama-1b")
    draft_path = random_model_path("random:llama-tiny")
    plain = LLM(target_path, quant="int8", max_model_len=1024)
    spec = LLM(target_path, quant="int8", max_model_len=1024, speculative={
        "method": "draft", "draft_model": str(draft_path), "draft_quant": "int8",
        "num_speculative_tokens": 4})  # fmt: skip
    prompt = list(range(1000, 1032))
    params = SamplingParams(max_tokens=DRAFT_TOKENS, temperature=0, ignore_eos=True)
    reference = plain.generate([prompt], params)[0].token_ids
    speculator = spec.engine_loop.ctx.speculator
    real = speculator.proposer
    rows = []
    for agreement in DRAFT_AGREEMENTS:
        speculator.proposer = _OracleDraft(real, reference, len(prompt), agreement)
        spec.generate([prompt], params)  # warm-up
        speeds: dict[str, list[float]] = {"plain": [], "draft": []}
        proposed = accepted = 0
        for _ in range(runs):
            for name, llm in (("plain", plain), ("draft", spec)):
                out = llm.generate([prompt], params)[0]
                if out.token_ids != reference:
                    raise AssertionError("a draft changed the greedy tokens")
                speeds[name].append(_decode_tok_s(out))
                proposed += out.metrics.spec_proposed
                accepted += out.metrics.spec_accepted
        plain_s, spec_s = statistics.median(speeds["plain"]), statistics.median(speeds["draft"])
        rows.append({
            "kind": "draft_curve", "target": "random:llama-1b int8",
            "draft": "random:llama-tiny int8", "draft_agreement": agreement, "runs": runs,
            "gen_tokens": DRAFT_TOKENS, "plain_decode_tok_s": plain_s,
            "speculative_decode_tok_s": spec_s, "speedup": spec_s / plain_s,
            "acceptance_rate": accepted / proposed if proposed else None,
        })  # fmt: skip
    speculator.proposer = real
    for llm in (plain, spec):
        llm.close()
    return rows


def _task_row(task: str, method: str, plain, spec, ids: list, params, runs: int) -> dict:
    """Plain and speculative decode of one task, taking turns run by run."""
    for llm in (plain, spec):  # warm-up (compilation, prefix cache)
        llm.generate(ids, params)
    speeds: dict[str, list[float]] = {"plain": [], method: []}
    proposed = accepted = checks = 0
    draft_s = decode_s = 0.0
    for _ in range(runs):
        outs = {}
        for name, llm in (("plain", plain), (method, spec)):
            outs[name] = [llm.generate([i], params)[0] for i in ids]
            speeds[name].append(statistics.mean(_decode_tok_s(o) for o in outs[name]))
        if [o.token_ids for o in outs["plain"]] != [o.token_ids for o in outs[method]]:
            raise AssertionError(f"{method} speculation changed the greedy tokens of {task}")
        for m in (o.metrics for o in outs[method]):
            proposed, accepted = proposed + m.spec_proposed, accepted + m.spec_accepted
            checks, draft_s = checks + m.spec_steps, draft_s + m.spec_draft_s
            decode_s += m.total_s - m.ttft_s
    plain_s, spec_s = statistics.median(speeds["plain"]), statistics.median(speeds[method])
    return {
        "kind": "task", "task": task, "method": method, "speculative": METHODS[method],
        "runs": runs, "prompt_tokens": statistics.mean(len(i) for i in ids),
        "gen_tokens": GEN_TOKENS, "plain_decode_tok_s": plain_s,
        "speculative_decode_tok_s": spec_s, "speedup": spec_s / plain_s,
        "acceptance_rate": accepted / proposed if proposed else None,
        "mean_accepted_length": accepted / checks if checks else None,
        "draft_time_share": draft_s / decode_s,
    }  # fmt: skip


def _decode_tok_s(output) -> float:
    m = output.metrics
    return (m.generated_tokens - 1) / (m.total_s - m.ttft_s)


def _batch_row(plain, spec, runs: int) -> dict:  # spec: the n-gram engine
    """16 chat requests together: aggregate tokens after each one's first over the time
    all were decoding (from the last first token to the last token)."""
    from engine import SamplingParams

    prompts = [f"Write a few sentences about the number {i}." for i in range(BATCH)]
    params = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    speeds: dict[str, list[float]] = {"plain": [], "ngram": []}
    proposed = 0
    for run in range(runs + 1):
        for name, llm in (("plain", plain), ("ngram", spec)):
            ids = [llm.encode_chat([{"role": "user", "content": p}])[1] for p in prompts]
            outs = llm.generate(ids, params)
            first = max(o.metrics.ttft_s for o in outs)
            last = max(o.metrics.total_s for o in outs)
            if run:  # the first is a warm-up
                speeds[name].append(
                    sum(o.metrics.generated_tokens - 1 for o in outs) / (last - first)
                )
            if name == "ngram":
                proposed += sum(o.metrics.spec_proposed for o in outs)
    plain_s, spec_s = statistics.median(speeds["plain"]), statistics.median(speeds["ngram"])
    return {
        "kind": "batch", "batch": BATCH, "method": "ngram", "runs": runs,
        "plain_decode_tok_s": plain_s, "ngram_decode_tok_s": spec_s, "ratio": spec_s / plain_s,
        "proposed_tokens": proposed,
    }  # fmt: skip


def write_speculative(rows: list[dict]) -> None:
    """bench/results/speculative.json, the rows stamped with the machine."""
    from bench.report import write_rows

    write_rows("speculative", rows)
