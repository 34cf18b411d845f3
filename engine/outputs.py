"""What a finished (or streamed) request returns to the user."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestMetrics:
    """Timings of one request, in seconds.

    ttft_s: request start to the first generated token (prefill plus one sampling step).
    tpot_s: mean time per generated token after the first.
    tokens_per_s: decode speed, 1 / tpot_s (generated / total time when only one token).
    """

    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache
    generated_tokens: int = 0
    ttft_s: float = 0.0
    tpot_s: float = 0.0
    total_s: float = 0.0

    def record_token(self, elapsed_s: float) -> None:
        """Account one generated token, `elapsed_s` after the request started."""
        self.generated_tokens += 1
        self.total_s = elapsed_s
        if self.generated_tokens == 1:
            self.ttft_s = elapsed_s
        else:
            self.tpot_s = (elapsed_s - self.ttft_s) / (self.generated_tokens - 1)

    @property
    def tokens_per_s(self) -> float:
        if self.generated_tokens > 1 and self.tpot_s > 0:
            return 1.0 / self.tpot_s
        return self.generated_tokens / self.total_s if self.total_s > 0 else 0.0


@dataclass
class RequestOutput:
    """One prompt's result: text, token ids, why it stopped, and its timings.

    finish_reason is "stop" (EOS, a stop token or a stop string), "length" (max_tokens or the
    context window) or "abort" (the caller stopped a stream).
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    metrics: RequestMetrics = field(default_factory=RequestMetrics)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def to_dict(self) -> dict:
        m = self.metrics
        return {
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
