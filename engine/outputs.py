"""What a finished (or streamed) request returns to the user."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.tool_calls import ToolCall


@dataclass
class RequestMetrics:
    """Timings of one request, in seconds, counted from when it was submitted.

    ttft_s: submission to the first generated token (queueing, prefill, one sampling step).
    tpot_s: mean time per output token of a sequence after its first (a speculative step
    can give a sequence several).
    tokens_per_s: decode speed of one sequence, 1 / tpot_s (generated / total with one token).
    generated_tokens counts the tokens of every sequence of the request (n > 1, beams).
    spec_proposed / spec_accepted: speculative tokens proposed and accepted (engine/
    speculative.py); their ratio is the acceptance rate.
    spec_steps: steps that checked proposals; accepted / steps is the mean accepted length.
    spec_draft_s: time the engine spent proposing for this request (a draft model's passes,
    shared by every sequence of the step); over the decode time, the draft time share.
    """

    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache
    generated_tokens: int = 0
    steps: int = 0
    ttft_s: float = 0.0
    tpot_s: float = 0.0
    total_s: float = 0.0
    spec_proposed: int = 0
    spec_accepted: int = 0
    spec_steps: int = 0
    spec_draft_s: float = 0.0
    first_tokens: int = 0  # tokens of the first step: one per sequence

    def record_step(self, elapsed_s: float, new_tokens: int = 1) -> None:
        """Account one decode step that produced `new_tokens`, `elapsed_s` after submission."""
        self.generated_tokens += new_tokens
        self.steps += 1
        self.total_s = elapsed_s
        if self.steps == 1:
            self.ttft_s = elapsed_s
            self.first_tokens = new_tokens
        elif self.generated_tokens > self.first_tokens:
            per_sequence = (self.generated_tokens - self.first_tokens) / max(1, self.first_tokens)
            self.tpot_s = (elapsed_s - self.ttft_s) / per_sequence

    @property
    def acceptance_rate(self) -> float | None:
        """Share of the speculative tokens proposed that were accepted (None: none)."""
        return self.spec_accepted / self.spec_proposed if self.spec_proposed else None

    @property
    def mean_accepted_length(self) -> float | None:
        """Proposed tokens accepted per step that checked proposals (None: none)."""
        return self.spec_accepted / self.spec_steps if self.spec_steps else None

    @property
    def draft_time_share(self) -> float | None:
        """Share of the decode time (after the first token) spent proposing (None: none)."""
        decode_s = self.total_s - self.ttft_s
        return min(1.0, self.spec_draft_s / decode_s) if self.spec_steps and decode_s > 0 else None

    def speculative_dict(self) -> dict:
        """The speculative counts and ratios, as --json and the bench print them."""
        return {
            "spec_proposed": self.spec_proposed,
            "spec_accepted": self.spec_accepted,
            "acceptance_rate": self.acceptance_rate,
            "mean_accepted_length": self.mean_accepted_length,
            "draft_time_share": self.draft_time_share,
        }

    @property
    def tokens_per_s(self) -> float:
        if self.steps > 1 and self.tpot_s > 0:
            return 1.0 / self.tpot_s
        return self.generated_tokens / self.total_s if self.total_s > 0 else 0.0


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability and the most likely alternatives at its step."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), most likely first


@dataclass
class CompletionOutput:
    """One generated continuation of a prompt (a request with n > 1 has several).

    finish_reason is "stop" (EOS, a stop token or a stop string), "length" (max_tokens or the
    context window), "abort" (the caller stopped a stream, or the request could not run) or
    "error" (it failed inside the engine; RequestOutput.error says why, the log has the
    traceback).
    cumulative_logprob is the sum of the model's log-probabilities of the generated tokens;
    it is computed only where it is needed (best_of > n, beam search, logprobs).
    logprobs holds one entry per generated token when SamplingParams.logprobs was set.
    tool_calls holds the calls parsed from `text` when a chat request had tools (None when
    it had none, or the model called nothing).
    """

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    cumulative_logprob: float | None = None
    logprobs: list[TokenLogprob] | None = None
    tool_calls: list[ToolCall] | None = None


@dataclass
class RequestOutput:
    """One prompt's result: its completions, why they stopped, and the request's timings.

    `text`, `token_ids` and `finish_reason` are those of the first completion, which is the
    only one unless SamplingParams asked for n > 1.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=lambda: [CompletionOutput(0)])
    metrics: RequestMetrics = field(default_factory=RequestMetrics)
    error: str | None = None  # why the request was aborted by the engine, if it was

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.outputs)

    def abort(self, error: str | None = None) -> None:
        """Mark every unfinished completion aborted."""
        for c in self.outputs:
            if c.finish_reason is None:
                c.finish_reason = "abort"
        if error is not None:
            self.error = error

    def fail(self, error: str) -> None:
        """End the request with finish reason "error" on every completion, finished or not:
        it failed inside the engine (a bug, logged with its traceback), so none of its
        results can be trusted; the other requests went on."""
        for c in self.outputs:
            c.finish_reason = "error"
        self.error = error

    def to_dict(self) -> dict:
        m = self.metrics
        result = {
            "id": self.request_id,
            "text": self.text,
            "token_ids": self.token_ids,
            "finish_reason": self.finish_reason,
            "prompt_tokens": m.prompt_tokens,
            "cached_prompt_tokens": m.cached_prompt_tokens,
            "generated_tokens": m.generated_tokens,
            "ttft_s": m.ttft_s,
            "tpot_s": m.tpot_s,
            "tokens_per_s": m.tokens_per_s,
        }
        if m.spec_proposed:
            result.update(m.speculative_dict())
        if len(self.outputs) > 1:
            result["outputs"] = [
                {
                    "index": c.index,
                    "text": c.text,
                    "token_ids": c.token_ids,
                    "finish_reason": c.finish_reason,
                    "cumulative_logprob": c.cumulative_logprob,
                }
                for c in self.outputs
            ]
        if self.error is not None:
            result["error"] = self.error
        return result
