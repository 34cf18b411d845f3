"""The paged KV cache every path uses, and the ForwardBatch that tells the model where tokens go.

Keys and values live in fixed-size blocks of one storage array per K and V, shape
(layers, num_blocks, block_size, kv_heads, head_dim), allocated by the Backend (numpy on the
CPU, device memory on a GPU). Each sequence owns a block table: the list of its blocks in
order. Everything else here is plain Python bookkeeping, as in vLLM's PagedAttention:

- Blocks are reference-counted. `fork` lets a child share its parent's blocks; the first
  write into a shared, partly filled block copies it (copy-on-write).
- Full blocks are keyed by an integer chained per block, a 128-bit keyed BLAKE2b of (the
  previous block's key, their token ids), as in vLLM's block pool: a lookup costs the same at
  any depth, and keys never nest. The hash key is random per process, so prompts crafted to
  collide with another user's prefix cannot be computed offline (Python's own `hash` of ints
  is public and unsalted), and 128 bits make an accidental collision negligible. A
  sequence whose prompt starts with
  blocks already computed (a system prompt, a chat history) reuses them instead of
  recomputing. Freed blocks keep their contents and key until they are needed again; the
  least recently freed is reused first.
- `reserve` takes the slots of one forward pass and `rollback` gives them back, so the
  blocks of a step are taken whole or not at all.

model.py only hands a ForwardBatch to `Backend.attention`.
"""

from __future__ import annotations

import array
import hashlib
import os
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import psutil

from engine.errors import InvalidInputError, LaminaError

if TYPE_CHECKING:
    from engine.backends import Backend

BLOCK_SIZE = 16
# Share of the RAM psutil reports available that the KV cache may take by default. The
# storage is allocated lazily (np.zeros), so unused blocks cost address space, not memory.
DEFAULT_KV_FRACTION = 0.2
# Storage kinds of keys and values. int8 keeps one float32 scale per (token, kv head) row and
# takes (head_dim + 4) / (4 * head_dim) of the float32 memory: 27% at head_dim 64.
KV_DTYPES = ("float32", "int8")


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: str) -> int:
    """Bytes of keys and values (and their scales) that one token takes in every layer."""
    if dtype not in KV_DTYPES:
        raise InvalidInputError(
            f"KV cache dtype must be one of {', '.join(KV_DTYPES)}, got {dtype!r}"
        )
    row = head_dim + 4 if dtype == "int8" else 4 * head_dim
    return 2 * num_layers * num_kv_heads * row


class NoFreeBlocksError(LaminaError):
    """The KV cache has no free block left; the scheduler preempts a sequence and retries."""


class ReservationError(Exception):
    """Reserving the slots of one sequence of a step failed; every reservation of the step
    was rolled back. `seq_id` names the sequence, and the cause is chained."""

    def __init__(self, seq_id: Hashable) -> None:
        super().__init__(f"reserving KV slots for sequence {seq_id!r} failed")
        self.seq_id = seq_id


# A full block's identity: a 128-bit hash of (the previous block's key or None, its tokens).
BlockKey = int
_HASH_KEY = os.urandom(16)


def block_key(parent: BlockKey | None, tokens: Sequence[int]) -> BlockKey:
    """The prefix-cache key of a full block: fixed-size, whatever its depth."""
    digest = hashlib.blake2b(digest_size=16, key=_HASH_KEY)
    digest.update(b"" if parent is None else parent.to_bytes(16, "little"))
    digest.update(array.array("q", tokens).tobytes())
    return int.from_bytes(digest.digest(), "little")


class BlockAllocator:
    """Reference counts, a free list and the prefix-cache index of the blocks."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise InvalidInputError(f"a KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.refcount = np.zeros(num_blocks, dtype=np.int32)
        # A stack, lowest block on top: the block freed last (still in cache, its pages
        # mapped) is the next one handed out, rather than rotating through the whole pool
        # and faulting in fresh pages.
        self._never_cached: list[int] = list(range(num_blocks - 1, -1, -1))
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, unused; LRU first
        self._key_of: dict[int, BlockKey] = {}
        self._block_of: dict[BlockKey, int] = {}

    @property
    def num_free(self) -> int:
        return len(self._never_cached) + len(self._evictable)

    def allocate(self) -> int:
        """A block with refcount 1; reuses blocks that never held a cached prefix first."""
        if self._never_cached:
            block = self._never_cached.pop()
        elif self._evictable:
            block, _ = self._evictable.popitem(last=False)
            del self._block_of[self._key_of.pop(block)]
        else:
            raise NoFreeBlocksError(f"all {self.num_blocks} KV cache blocks are in use")
        self.refcount[block] = 1
        return block

    def share(self, block: int) -> None:
        if self.refcount[block] < 1:
            raise RuntimeError(f"block {block} is free and cannot be shared")
        self.refcount[block] += 1

    def release(self, block: int) -> None:
        if self.refcount[block] < 1:
            raise RuntimeError(f"block {block} released more often than taken")
        self.refcount[block] -= 1
        if self.refcount[block] == 0:
            if block in self._key_of:
                self._evictable[block] = None
            else:
                self._never_cached.append(block)

    def lookup(self, key: BlockKey) -> int | None:
        """The cached block holding `key`, now taken by the caller; None if not cached."""
        block = self._block_of.get(key)
        if block is None:
            return None
        if self.refcount[block] == 0:
            del self._evictable[block]
        self.refcount[block] += 1
        return block

    def register(self, block: int, key: BlockKey) -> None:
        """Record that full block `block` holds `key` (first writer wins)."""
        if key not in self._block_of and block not in self._key_of:
            self._block_of[key] = block
            self._key_of[block] = key

    def unregister(self, block: int) -> None:
        """Forget what `block` holds: its holder is about to overwrite part of it."""
        key = self._key_of.pop(block, None)
        if key is not None:
            del self._block_of[key]


@dataclass
class _Sequence:
    blocks: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # tokens whose K/V are written
    keys: list[BlockKey] = field(default_factory=list)  # keys of the full blocks
    reserved: int = 0  # token slots reserved by the forward pass in flight
    blocks_before_reserve: int = 0  # len(blocks) before that reservation (for rollback)


class PagedKVCache:
    """Block storage plus the block tables of the sequences being run."""

    def __init__(
        self,
        backend: Backend,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        num_blocks: int,
        block_size: int = BLOCK_SIZE,
        dtype: str = "float32",
    ) -> None:
        kv_bytes_per_token(num_layers, num_kv_heads, head_dim, dtype)  # checks dtype
        self.block_size = block_size
        self.dtype = dtype
        self.allocator = BlockAllocator(num_blocks)
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        self.k = backend.allocate_kv(shape, dtype)
        self.v = backend.allocate_kv(shape, dtype)
        # int8 storage: one scale per (token, kv head) row; None for float32.
        self.k_scale = self.v_scale = None
        if dtype == "int8":
            self.k_scale = backend.allocate_kv(shape[:-1], "float32")
            self.v_scale = backend.allocate_kv(shape[:-1], "float32")
        self._backend = backend
        self._seqs: dict[Hashable, _Sequence] = {}

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def __contains__(self, seq_id: Hashable) -> bool:
        return seq_id in self._seqs

    def sequence_ids(self) -> list[Hashable]:
        """The sequences holding blocks now."""
        return list(self._seqs)

    def length(self, seq_id: Hashable) -> int:
        return len(self._seqs[seq_id].tokens)

    def block_table(self, seq_id: Hashable) -> list[int]:
        return list(self._seqs[seq_id].blocks)

    def usage(self) -> tuple[int, int]:
        """(token slots holding a sequence's token, slots in the blocks sequences hold).

        A shared block counts once, with the fill of its longest holder, so
        1 - used / allocated is the memory wasted by block granularity (vLLM's figure).
        """
        fill: dict[int, int] = {}
        for seq in self._seqs.values():
            length = len(seq.tokens) + seq.reserved
            for i, block in enumerate(seq.blocks):
                used = min(self.block_size, max(length - i * self.block_size, 0))
                fill[block] = max(fill.get(block, 0), used)
        return sum(fill.values()), len(fill) * self.block_size

    def add_sequence(self, seq_id: Hashable, prompt: Sequence[int]) -> int:
        """Start a sequence; return how many leading prompt tokens the prefix cache already holds.

        At least one prompt token is always left to compute, since its logits are needed.
        """
        if seq_id in self._seqs:
            raise KeyError(f"sequence {seq_id!r} is already in the cache")
        seq = _Sequence()
        self._seqs[seq_id] = seq
        parent = None
        reusable = (len(prompt) - 1) // self.block_size
        for i in range(reusable):
            tokens = prompt[i * self.block_size : (i + 1) * self.block_size]
            key = block_key(parent, tokens)
            block = self.allocator.lookup(key)
            if block is None:
                break
            seq.blocks.append(block)
            seq.keys.append(key)
            seq.tokens.extend(tokens)
            parent = key
        return len(seq.tokens)

    def fork(self, parent_id: Hashable, child_id: Hashable) -> None:
        """The child starts as a copy of the parent, sharing all its blocks."""
        parent = self._seqs[parent_id]
        if child_id in self._seqs:
            raise KeyError(f"sequence {child_id!r} is already in the cache")
        for block in parent.blocks:
            self.allocator.share(block)
        self._seqs[child_id] = _Sequence(
            list(parent.blocks), list(parent.tokens), list(parent.keys)
        )

    def blocks_needed(self, seq_id: Hashable, num_tokens: int) -> int:
        """Free blocks that `reserve(seq_id, num_tokens)` would take."""
        seq = self._seqs[seq_id]
        new = self.blocks_for(len(seq.tokens) + num_tokens) - len(seq.blocks)
        return new + int(self._needs_copy(seq))

    def reserve(self, seq_id: Hashable, num_tokens: int) -> np.ndarray:
        """Slots (block * block_size + offset) for the next `num_tokens` tokens of a sequence.

        All or nothing: raises NoFreeBlocksError, changing nothing, if the blocks are short.
        """
        seq = self._seqs[seq_id]
        needed = self.blocks_needed(seq_id, num_tokens)
        if needed > self.allocator.num_free:
            raise NoFreeBlocksError(f"{needed} KV blocks needed, {self.allocator.num_free} free")
        before = len(seq.blocks)
        try:
            if self._needs_copy(seq):
                self._copy_last_block(seq)
            while len(seq.blocks) < self.blocks_for(len(seq.tokens) + num_tokens):
                seq.blocks.append(self.allocator.allocate())
        except BaseException:
            while len(seq.blocks) > before:
                self.allocator.release(seq.blocks.pop())
            raise
        seq.reserved = num_tokens
        seq.blocks_before_reserve = before
        positions = np.arange(len(seq.tokens), len(seq.tokens) + num_tokens)
        blocks = np.asarray(seq.blocks, dtype=np.int64)[positions // self.block_size]
        return blocks * self.block_size + positions % self.block_size

    def commit(self, seq_id: Hashable, token_ids: Sequence[int]) -> None:
        """Mark the reserved tokens as written; index the blocks that became full."""
        seq = self._seqs[seq_id]
        if len(token_ids) != seq.reserved:
            raise RuntimeError(f"committing {len(token_ids)} tokens, {seq.reserved} reserved")
        seq.tokens.extend(int(t) for t in token_ids)
        seq.reserved = 0
        while len(seq.keys) < len(seq.tokens) // self.block_size:
            i = len(seq.keys)
            parent = seq.keys[-1] if seq.keys else None
            tokens = seq.tokens[i * self.block_size : (i + 1) * self.block_size]
            key = block_key(parent, tokens)
            self.allocator.register(seq.blocks[i], key)
            seq.keys.append(key)

    def rollback(self, seq_id: Hashable) -> None:
        """Undo `reserve`: the reserved slots are not written; blocks it added go back.

        A block copied on write stays: it holds the same tokens as the one it replaced.
        """
        seq = self._seqs[seq_id]
        if not seq.reserved:
            return
        while len(seq.blocks) > max(seq.blocks_before_reserve, self.blocks_for(len(seq.tokens))):
            self.allocator.release(seq.blocks.pop())
        seq.reserved = 0

    def truncate(self, seq_id: Hashable, length: int) -> None:
        """Forget the sequence's tokens from `length` on (speculative tokens the target
        model rejected): blocks past the new end go back, still indexed by the tokens they
        hold, which are true; a full block that becomes partial, and that this sequence
        alone holds, leaves the prefix index, since its tail will be overwritten (a shared
        one is copied on the next write, so its index entry stays true)."""
        seq = self._seqs[seq_id]
        if seq.reserved:
            raise RuntimeError("cannot truncate a sequence with slots reserved")
        if not 0 <= length <= len(seq.tokens):
            raise ValueError(f"cannot truncate {len(seq.tokens)} tokens to {length}")
        del seq.tokens[length:]
        kept = self.blocks_for(length)
        while len(seq.keys) > length // self.block_size:
            seq.keys.pop()
            block = seq.blocks[len(seq.keys)]
            if len(seq.keys) < kept and self.allocator.refcount[block] == 1:
                self.allocator.unregister(block)
        while len(seq.blocks) > kept:
            self.allocator.release(seq.blocks.pop())

    def free(self, seq_id: Hashable) -> None:
        """Release a sequence's blocks, its last block first so prefixes stay cached longer."""
        seq = self._seqs.pop(seq_id)
        for block in reversed(seq.blocks):
            self.allocator.release(block)

    def _needs_copy(self, seq: _Sequence) -> bool:
        """The next token goes into a partly filled block that another sequence shares."""
        partial = len(seq.tokens) % self.block_size > 0
        return partial and self.allocator.refcount[seq.blocks[-1]] > 1

    def _copy_last_block(self, seq: _Sequence) -> None:
        old = seq.blocks[-1]
        new = self.allocator.allocate()
        try:
            for storage in (self.k, self.v, self.k_scale, self.v_scale):
                if storage is not None:
                    storage[:, new] = storage[:, old]
        except BaseException:
            self.allocator.release(new)
            raise
        self.allocator.release(old)
        seq.blocks[-1] = new


def budget_blocks(
    block_bytes: int,
    memory_mb: float | None,
    fraction: float | None,
    free_bytes: int | None = None,
) -> int:
    """Blocks that fit a KV budget given in MB, or as a fraction of `free_bytes`: the memory
    free where the backend allocates the cache (default: the RAM psutil reports available)."""
    if memory_mb is not None:
        if memory_mb <= 0:
            raise InvalidInputError(f"the KV cache budget must be positive, got {memory_mb} MB")
        budget = memory_mb * 2**20
    else:
        fraction = DEFAULT_KV_FRACTION if fraction is None else fraction
        if not 0 < fraction <= 1:
            raise InvalidInputError(f"the KV cache fraction must be in (0, 1], got {fraction}")
        if free_bytes is None:
            free_bytes = psutil.virtual_memory().available
        budget = free_bytes * fraction
    return int(budget // block_bytes)


@dataclass
class ForwardBatch:
    """The tokens of one forward pass: chunks of one or more sequences, concatenated."""

    token_ids: np.ndarray  # (T,) int64
    positions: np.ndarray  # (T,) int64
    cache: PagedKVCache
    slots: np.ndarray  # (T,) int64: where each token's key and value are written
    query_start: np.ndarray  # (B + 1,) int64: sequence s owns rows query_start[s]:[s + 1]
    context_lens: np.ndarray  # (B,) int64: tokens of s in the cache, including this pass's
    block_tables: np.ndarray  # (B, max_blocks) int32
    logits_rows: np.ndarray  # rows of the batch whose logits are wanted

    @classmethod
    def build(
        cls,
        cache: PagedKVCache,
        chunks: Sequence[tuple[Hashable, Sequence[int]]],
        all_logits: bool = False,
        logit_counts: Sequence[int] | None = None,
    ) -> ForwardBatch:
        """Reserve slots for each (sequence, new tokens) chunk and describe the pass.

        Logits are wanted for the last token of each chunk, for its last logit_counts[i]
        tokens (a speculative chunk's proposals), or for every token. All or nothing: if
        one reservation fails, the others are rolled back and ReservationError names the
        sequence.
        """
        slots, positions, starts, lens, tables = [], [], [0], [], []
        reserved: list[Hashable] = []
        try:
            for seq_id, tokens in chunks:
                try:
                    first = cache.length(seq_id)
                    slots.append(cache.reserve(seq_id, len(tokens)))
                except Exception as error:
                    raise ReservationError(seq_id) from error
                reserved.append(seq_id)
                positions.append(np.arange(first, first + len(tokens)))
                starts.append(starts[-1] + len(tokens))
                lens.append(first + len(tokens))
                tables.append(cache.block_table(seq_id))
            width = max(len(t) for t in tables)
            block_tables = np.zeros((len(tables), width), dtype=np.int32)
            for row, table in zip(block_tables, tables, strict=True):
                row[: len(table)] = table
            query_start = np.asarray(starts, dtype=np.int64)
            return cls(
                token_ids=np.asarray([t for _, toks in chunks for t in toks], dtype=np.int64),
                positions=np.concatenate(positions).astype(np.int64),
                cache=cache,
                slots=np.concatenate(slots),
                query_start=query_start,
                context_lens=np.asarray(lens, dtype=np.int64),
                block_tables=block_tables,
                logits_rows=_logits_rows(query_start, all_logits, logit_counts),
            )
        except BaseException:  # Ctrl-C included: nothing stays reserved
            for seq_id in reserved:
                cache.rollback(seq_id)
            raise


def _logits_rows(
    query_start: np.ndarray, all_logits: bool, counts: Sequence[int] | None
) -> np.ndarray:
    """The rows of a pass whose logits are wanted, in order."""
    if all_logits:
        return np.arange(query_start[-1])
    ends = query_start[1:]
    if counts is None:
        return ends - 1
    if len(counts) != len(ends) or any(
        not 1 <= c <= e - s for c, s, e in zip(counts, query_start[:-1], ends, strict=True)
    ):
        raise ValueError("each chunk wants between one logit row and one per token")
    return np.concatenate([np.arange(e - c, e) for c, e in zip(counts, ends, strict=True)])
