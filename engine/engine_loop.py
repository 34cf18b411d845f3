"""The engine loop: owns the model, the KV cache and the scheduler, and runs forward passes.

Every entry point (Python API, CLI, batch runner, server) submits requests here; nothing else
calls the model. `step` runs one iteration of continuous batching: the scheduler picks the
chunks, one forward pass computes them all, and each request turns its logits into tokens.
Whoever waits for a result drives the loop by calling `step`, under a lock, so several
streams interleaved in one thread, or served from several threads, all make progress.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import numpy as np

from engine.beam_search import BeamSearchGroup
from engine.config import ModelConfig
from engine.errors import ContextLengthError, LaminaError
from engine.kv_cache import (
    BLOCK_SIZE,
    ForwardBatch,
    PagedKVCache,
    budget_blocks,
    kv_bytes_per_token,
)
from engine.loader.checkpoint import checkpoint_layer_tensors, open_layer_stream
from engine.loader.model_loader import LoadedModel
from engine.model import Transformer
from engine.outputs import RequestOutput
from engine.sampling import SamplingParams
from engine.scheduler import (
    DEFAULT_MAX_NUM_BATCHED_TOKENS,
    DEFAULT_MAX_NUM_SEQS,
    Scheduler,
    Sequence,
)
from engine.sequence_group import GenerationContext, SamplingGroup, SequenceGroup
from offload.placement import (
    PlacementPlan,
    Tier,
    default_cpu_budget,
    default_gpu_budget,
    plan_placement,
)
from offload.streaming import LayerLayout, LayerStream

if TYPE_CHECKING:
    from offload.device_stream import DeviceLayerStream

# How a request aborted by a failed forward pass is told apart (a bug, not bad input).
FORWARD_FAILED = "the forward pass failed"


class EngineLoop:
    def __init__(
        self,
        loaded: LoadedModel,
        backend: object,
        max_model_len: int | None = None,
        kv_cache_mb: float | None = None,
        kv_cache_fraction: float | None = None,
        enable_prefix_caching: bool = True,
        max_num_seqs: int = DEFAULT_MAX_NUM_SEQS,
        max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS,
        kv_cache_dtype: str = "float32",
        cpu_memory: int | None = None,
        drop_page_cache: bool = False,
        gpu_memory: int | None = None,
    ):
        """cpu_memory: host RAM budget in bytes for weights, KV cache and activations
        (default: derived from available RAM for memory-mapped checkpoints; unplanned for
        weights already loaded into RAM). Layers that do not fit stream from disk, each
        range dropped from the page cache after reading when drop_page_cache.

        gpu_memory: with the CUDA backend, the device budget in bytes for weights, KV cache
        and activations (default: the GPU's free memory less a margin). Layers beyond it
        stay in pinned host RAM, under cpu_memory, or on disk, and are copied in while
        earlier layers compute. Under either budget, or when the weights do not fit the
        GPU, the KV cache defaults to one max_model_len context."""
        self.loaded = loaded
        self.backend = backend
        on_gpu = backend.name == "cuda"
        if gpu_memory is not None and not on_gpu:
            raise LaminaError(
                f"a GPU memory budget applies to the CUDA backend, but this model runs on the "
                f"{backend.name}; drop --gpu-memory, or use --device cuda"
            )
        if on_gpu:  # placement moves the weights that fit
            free = backend.free_memory()  # before any weight is on the device
            gpu_budget = default_gpu_budget(free) if gpu_memory is None else gpu_memory
            weight_bytes = loaded.weights.nbytes
            budgeted = cpu_memory is not None or gpu_memory is not None
            budgeted = budgeted or weight_bytes > gpu_budget
            free = max(0, free - weight_bytes)
        else:
            backend.prepare_weights(loaded.weights)  # before streaming: it walks every layer
            budgeted, free = cpu_memory is not None, backend.free_memory()
        self.model = Transformer(loaded.config, loaded.weights, backend)
        limit = loaded.config.max_position_embeddings
        if max_model_len is not None and max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2, got {max_model_len}")
        self.max_model_len = min(max_model_len or limit, limit)
        # numba's workqueue threading layer aborts the process on concurrent parallel calls.
        self._lock = threading.RLock()
        self._score_ids = itertools.count()
        self.ctx = GenerationContext(
            tokenizer=loaded.tokenizer,
            eos_token_ids=tuple(loaded.config.eos_token_ids),
            vocab_size=min(loaded.tokenizer.vocab_size, loaded.config.vocab_size),
            max_model_len=self.max_model_len,
        )
        self.cache = self._make_cache(
            kv_cache_mb, kv_cache_fraction, kv_cache_dtype, budgeted, free
        )
        reserve = self.kv_cache_bytes + activation_bytes(
            loaded.config, max_num_batched_tokens, max_num_seqs
        )
        self.placement: PlacementPlan | None = None
        self.layer_stream: LayerStream | None = None  # disk -> host, on either device
        self.device_stream: DeviceLayerStream | None = None  # host -> GPU
        if on_gpu:
            from engine.device_placement import place_on_device  # imports numba.cuda

            cpu_budget = default_cpu_budget() if cpu_memory is None else cpu_memory
            placed = place_on_device(
                loaded, backend, cpu_budget, gpu_budget, reserve, drop_page_cache
            )
            self.placement = placed.plan
            self.device_stream, self.layer_stream = placed.device_stream, placed.disk_stream
        else:
            self._place_layers(cpu_memory, reserve, drop_page_cache)
        self.scheduler = Scheduler(
            self.cache, max_num_seqs, max_num_batched_tokens, enable_prefix_caching
        )

    def _make_cache(
        self,
        memory_mb: float | None,
        fraction: float | None,
        dtype: str,
        budgeted: bool,
        free: int,
    ) -> PagedKVCache:
        """free: RAM, or GPU memory left after the weights, which `fraction` shares."""
        cfg = self.loaded.config
        token_bytes = kv_bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dtype)
        needed = -(-self.max_model_len // BLOCK_SIZE)
        if budgeted and memory_mb is None and fraction is None:
            blocks = needed  # under a memory budget the cache defaults to one full context
        else:
            blocks = budget_blocks(token_bytes * BLOCK_SIZE, memory_mb, fraction, free)
        self.kv_cache_bytes = blocks * BLOCK_SIZE * token_bytes
        if blocks < needed:
            raise LaminaError(
                f"the KV cache budget holds {blocks * BLOCK_SIZE} tokens, less than one "
                f"{self.max_model_len}-token context ({token_bytes * self.max_model_len / 2**20:.0f}"
                " MB); raise the budget or lower max_model_len"
            )
        return PagedKVCache(
            self.backend,
            cfg.num_layers,
            cfg.num_kv_heads,
            cfg.head_dim,
            blocks,
            BLOCK_SIZE,
            dtype,
        )

    def _place_layers(self, cpu_memory: int | None, reserve: int, drop_page_cache: bool) -> None:
        """CPU backend: plan where the layers live under the host budget; stream from disk
        what does not fit. Weights already loaded into RAM without a budget have nothing left
        to plan. (With the CUDA backend, device_placement.place_on_device plans.)"""
        folder, weights = self.loaded.checkpoint, self.loaded.weights
        if cpu_memory is None and folder is None:
            return
        budget = default_cpu_budget() if cpu_memory is None else cpu_memory
        tensors = None if folder is None else checkpoint_layer_tensors(folder, len(weights.layers))
        if tensors is None:
            sizes = [layer.nbytes for layer in weights.layers]
        else:  # exactly what a streaming buffer holds (tensors keep their file alignment)
            sizes = [LayerLayout.of(specs).nbytes for specs in tensors]
        non_layer = weights.nbytes - sum(layer.nbytes for layer in weights.layers)
        self.placement = plan_placement(sizes, non_layer, budget, reserve_bytes=reserve)
        if self.placement.fully_resident:
            return
        if tensors is None:
            raise LaminaError(
                f"the model does not fit in the {budget / 2**20:.0f} MiB RAM budget, and only a "
                "lamina checkpoint can stream layers from disk: run `lamina quantize SRC OUT "
                "--weights int8` and load OUT"
            )
        on_disk = self.placement.layers(Tier.DISK)
        self.layer_stream = open_layer_stream(
            folder,
            {i: layer for i, layer in enumerate(weights.layers) if i not in on_disk},
            on_disk,
            tensors,
            self.placement.host_buffers.count,
            drop_page_cache,
        )
        weights.layers = self.layer_stream

    def close(self) -> None:
        """Release what the loop holds open: the device stream's copies, buffers and pinned
        memory (first: its copies may read the disk stream's buffers), then the disk
        stream's file and reader thread."""
        with self._lock:
            if self.device_stream is not None:
                self.device_stream.close()
            if self.layer_stream is not None:
                self.layer_stream.close()

    def submit(self, output: RequestOutput, params: SamplingParams) -> SequenceGroup:
        """Queue a request (checked first, so a bad prompt raises here)."""
        group = self.new_group(output, params)
        self.add(group)
        return group

    def new_group(self, output: RequestOutput, params: SamplingParams) -> SequenceGroup:
        """Check a request and build its group, without queueing it (no lock needed)."""
        self.check_prompt(output.prompt_token_ids)
        too_big = [t for t in params.logit_bias or () if t >= self.ctx.vocab_size]
        if too_big:
            raise ValueError(f"logit_bias token id {too_big[0]} is outside the vocabulary")
        kind = BeamSearchGroup if params.use_beam_search else SamplingGroup
        group = kind(output, params, self.ctx)
        group.check_fits(self.scheduler.max_num_seqs)
        return group

    def add(self, group: SequenceGroup) -> None:
        """Queue a group made by `new_group`."""
        with self._lock:
            self.scheduler.add(group)

    def abort(self, group: SequenceGroup) -> None:
        """Stop a request; its sequences and KV blocks are freed at once."""
        with self._lock:
            if not group.finished:
                self.scheduler.abort(group)

    def step(self) -> None:
        """One iteration: schedule, one forward pass over every chunk, then sample."""
        with self._lock:
            plan = self.scheduler.schedule()
            if not plan:
                return
            owner = {seq.seq_id: g for g in self.scheduler.running for seq in g.live}
            chunks = [(seq.seq_id, seq.tokens[seq.computed : seq.computed + n]) for seq, n in plan]
            try:
                batch = ForwardBatch.build(self.cache, chunks)
                logits = self.model.forward(batch)
            except BaseException as error:
                # A failed pass leaves reserved slots half-written: drop the requests in it.
                for group in {id(owner[s.seq_id]): owner[s.seq_id] for s, _ in plan}.values():
                    self.scheduler.abort(group, f"{FORWARD_FAILED}: {error!r}")
                raise
            ready: dict[int, tuple[SequenceGroup, list[tuple[Sequence, np.ndarray]]]] = {}
            for row, ((seq, n), (seq_id, tokens)) in enumerate(zip(plan, chunks, strict=True)):
                self.cache.commit(seq_id, tokens)
                seq.computed += n
                if seq.uncomputed == 0:
                    group = owner[seq_id]
                    ready.setdefault(id(group), (group, []))[1].append((seq, logits[row]))
            for group, items in ready.values():
                group.process(items, self.cache)
            self.scheduler.remove_finished()

    def start(self, output: RequestOutput, params: SamplingParams) -> Iterator[str]:
        """Check the request now; return a generator that queues it when first advanced,
        then drives the loop until it finishes, yielding the first completion's new text.

        Closing the generator early (e.g. Ctrl-C in a chat) aborts the request; one that is
        dropped unstarted never queues anything. With best_of > n the best completion is
        only known at the end, so its text comes at once.
        """
        return self._stream(self.new_group(output, params))

    def _stream(self, group: SequenceGroup) -> Iterator[str]:
        self.add(group)
        sent = 0
        streaming = group.params.best_of == group.params.n
        try:
            while True:
                text = group.output.text if streaming or group.finished else ""
                if len(text) > sent:
                    yield text[sent:]
                    sent = len(text)
                if group.finished:
                    return
                self.step()
        finally:
            self.abort(group)

    def run(
        self, requests: Iterable[tuple[RequestOutput, SamplingParams]]
    ) -> Iterator[RequestOutput]:
        """Run many requests through the scheduler; yield each output as it finishes.

        A request that cannot run (prompt too long, bad parameters) is yielded at once,
        aborted, with the reason in `output.error`; the others go on.

        Requests are pulled from the iterable lazily, keeping about two batches queued, so a
        million-line batch job does not tokenize everything up front. Closing the generator
        aborts whatever is still queued or running.
        """
        source = iter(requests)
        active: list[SequenceGroup] = []
        exhausted = False
        try:
            while True:
                while not exhausted and len(active) < 2 * self.scheduler.max_num_seqs:
                    item = next(source, None)
                    if item is None:
                        exhausted = True
                        continue
                    try:
                        active.append(self.submit(*item))
                    except (ValueError, LaminaError) as error:
                        item[0].abort(str(error))
                        yield item[0]
                if not active:
                    return
                self.step()
                for group in [g for g in active if g.finished]:
                    active.remove(group)
                    yield group.output
        finally:
            for group in active:
                self.abort(group)

    def prompt_logits(self, token_ids: list[int]) -> np.ndarray:
        """Logits at every position of `token_ids` (T, vocab), from one prefill pass."""
        self.check_prompt(token_ids, room_to_generate=0)
        seq_id = ("score", next(self._score_ids))
        with self._lock:
            self.cache.add_sequence(seq_id, [])
            try:
                batch = ForwardBatch.build(self.cache, [(seq_id, token_ids)], all_logits=True)
                return self.model.forward(batch)
            finally:
                self.cache.free(seq_id)

    def check_prompt(self, prompt: list[int], room_to_generate: int = 1) -> None:
        """Refuse empty prompts, unknown token ids, and prompts that leave fewer than
        `room_to_generate` free positions in the context window (0 when only scoring)."""
        if not prompt:
            raise ContextLengthError("the prompt is empty: there is no token to start from")
        bad = [i for i in prompt if not 0 <= i < self.loaded.config.vocab_size]
        if bad:
            raise ValueError(
                f"prompt token id {bad[0]} is outside the model's vocabulary "
                f"(0 .. {self.loaded.config.vocab_size - 1})"
            )
        longest = self.max_model_len - room_to_generate
        if len(prompt) > longest:
            raise ContextLengthError(
                f"the prompt has {len(prompt)} tokens but the context window is "
                f"{self.max_model_len}; shorten it to at most {longest} tokens"
            )


def activation_bytes(config: ModelConfig, tokens: int, seqs: int) -> int:
    """An estimate of the float32 activations of one forward pass of `tokens` tokens: the
    residual stream, norms, fused QKV, attention output and the fused MLP's intermediates,
    plus decode logits (and their sampling copies) for `seqs` sequences."""
    c = config
    per_token = 5 * c.hidden_size + 2 * c.q_size + 2 * c.kv_size + 3 * c.intermediate_size
    return 4 * (tokens * per_token + 2 * seqs * c.vocab_size)
