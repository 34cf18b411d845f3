"""ModelRunner: runs the chunks of a step through the model, on whichever device.

It owns what a forward pass needs besides the weights: the paged KV cache storage, the
placement of the layers (and the streams serving those not resident), and the activation
workspace, allocated once for `max_num_batched_tokens` tokens so a warm step allocates nothing
per layer. The engine loop owns the requests; the runner never sees them, only
(sequence id, new tokens) chunks.

A run is all or nothing for the KV cache: the slots of every chunk are reserved together, and
if the reservation or the pass fails they are rolled back before the error propagates.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import numba
import numpy as np

from engine.backends import Backend
from engine.config import ModelConfig
from engine.engine_config import EngineConfig
from engine.errors import LaminaError
from engine.kv_cache import (
    BLOCK_SIZE,
    ForwardBatch,
    NoFreeBlocksError,
    PagedKVCache,
    ReservationError,
    budget_blocks,
    kv_bytes_per_token,
)
from engine.layer_placement import CacheMemory, Placement, cache_memory, place_layers
from engine.loader.model_loader import LoadedModel
from engine.model import Transformer, Workspace, activation_widths
from engine.thread_policy import ThreadPolicy
from kernels_cpu.paged_attention import attention_scratch_shape

Chunk = tuple[Hashable, Sequence[int]]


class ModelRunner:
    def __init__(self, loaded: LoadedModel, backend: Backend, config: EngineConfig) -> None:
        self.backend = backend
        self.threads = ThreadPolicy(config.threads)  # the user's count, or adapted to the load
        self.threads.apply()  # placement times kernels (sparse or dense) with it
        model_config = loaded.config
        limit = model_config.context_limit
        self.max_model_len = min(config.max_model_len or limit, limit)
        memory = cache_memory(loaded, backend, config)
        self.cache = self._make_cache(model_config, config, memory)
        tokens, seqs = config.max_num_batched_tokens, config.max_num_seqs
        if config.speculative is not None:  # a logit row per proposal too
            seqs *= 1 + config.speculative.num_speculative_tokens
        reserve = self.kv_cache_bytes + activation_bytes(model_config, tokens, seqs)
        self.placement: Placement = place_layers(loaded, backend, config, memory, reserve)
        try:
            self.model = Transformer(model_config, loaded.weights, self.placement.layers, backend)
            self.workspace = Workspace(backend, model_config, tokens, seqs)
        except BaseException:  # the streams hold a thread, a file and pinned memory
            self.placement.close()
            raise

    def _make_cache(
        self, model: ModelConfig, config: EngineConfig, memory: CacheMemory
    ) -> PagedKVCache:
        dtype = config.kv_cache_dtype
        token_bytes = kv_bytes_per_token(
            model.num_layers, model.num_kv_heads, model.head_dim, dtype
        )
        needed = -(-self.max_model_len // BLOCK_SIZE)
        mb, fraction = config.kv_cache_mb, config.kv_cache_fraction
        if memory.budgeted and mb is None and fraction is None:
            blocks = needed  # under a memory budget the cache defaults to one full context
        else:
            blocks = budget_blocks(token_bytes * BLOCK_SIZE, mb, fraction, memory.free)
        self.kv_cache_bytes = blocks * BLOCK_SIZE * token_bytes
        if blocks < needed:
            raise LaminaError(
                f"the KV cache budget holds {blocks * BLOCK_SIZE} tokens, less than one "
                f"{self.max_model_len}-token context ({token_bytes * self.max_model_len / 2**20:.0f}"
                " MB); raise the budget or lower max_model_len"
            )
        return PagedKVCache(
            self.backend,
            model.num_layers,
            model.num_kv_heads,
            model.head_dim,
            blocks,
            BLOCK_SIZE,
            dtype,
        )

    def run(self, chunks: Sequence[Chunk], logit_counts: Sequence[int] | None = None) -> np.ndarray:
        """Logits of each chunk's last token (or last logit_counts[i] tokens), one row each
        in chunk order: a workspace view, valid until the next run. The chunks' slots stay
        reserved for the caller to commit.

        Raises ReservationError (nothing reserved) if a chunk's slots cannot be reserved;
        any error of the pass rolls every reservation back before it propagates.
        """
        batch = ForwardBatch.build(self.cache, chunks, logit_counts=logit_counts)
        try:
            self.threads.apply()
            return self.model.forward(batch, self.workspace)
        except BaseException:
            for seq_id, _ in chunks:
                self.cache.rollback(seq_id)
            raise

    def score(self, token_ids: Sequence[int], seq_id: Hashable) -> np.ndarray:
        """Logits at every position of `token_ids` (T, vocab), from one uncached prefill
        pass of a temporary sequence: a copy the caller keeps."""
        self.cache.add_sequence(seq_id, [])
        try:
            try:
                batch = ForwardBatch.build(self.cache, [(seq_id, token_ids)], all_logits=True)
            except ReservationError as error:
                if isinstance(error.__cause__, NoFreeBlocksError):
                    raise error.__cause__ from None  # a LaminaError: the cache is busy or small
                raise
            self.threads.apply()
            return np.array(self.model.forward(batch, self.workspace))
        finally:
            self.cache.free(seq_id)

    def close(self) -> None:
        """Release the layer streams' copies, buffers, pinned memory, file and thread."""
        self.placement.close()


# Split attention's partial sums on a GPU: a few (splits x tokens x heads x head_dim) floats,
# with splits only for batches too small to fill the SMs; 1 MiB bounds them on real GPUs.
_ATTENTION_PARTIALS = 2**20


def activation_bytes(config: ModelConfig, tokens: int, seqs: int) -> int:
    """The memory a forward pass of `tokens` tokens computes in, for the placement budget:
    the workspace (its buffers for `tokens` tokens and `seqs` rows of logits), the sampling
    copies of the logits, and the backends' scratch: the widest linear input as computed by
    a fused norm or gate (float32) and quantized (int16, with scales), a linear's result
    before it is added to the residual, the rotated q, k and a v copy, the CPU attention's
    work and part rows (per thread), and a margin for GPU split-attention partials.
    (Activation-sparse linears keep per-thread partial sums too, CPU only, not counted.)"""
    c = config
    per_token, per_row = activation_widths(c)
    workspace = tokens * sum(map(math.prod, per_token.values()))
    workspace += seqs * sum(map(math.prod, per_row.values()))
    sampling = 2 * seqs * c.vocab_size
    widest = max(c.hidden_size, c.intermediate_size)
    qkv = c.q_size + 2 * c.kv_size
    scratch_bytes = tokens * ((4 + 2) * widest + 4 + 4 * c.hidden_size + 4 * qkv)
    threads = numba.config.NUMBA_NUM_THREADS
    attention = 4 * math.prod(
        attention_scratch_shape(c.num_heads, c.num_kv_heads, c.head_dim, threads)
    )
    return 4 * (workspace + sampling) + scratch_bytes + attention + _ATTENTION_PARTIALS
