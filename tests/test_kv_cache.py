"""The paged KV cache's bookkeeping under random add/fork/append/free sequences.

A plain model of the cache is kept alongside: every sequence's token list. The K value a
sequence writes at position i is a function of its tokens 0..i, as real keys are, so a
prefix-cache hit must read back exactly the values of its own tokens. After each step the
allocator's refcounts must equal the number of block tables holding each block, no block may
be both free and held, and reading a sequence's K values back through its block table must
give the values of its own tokens (so copy-on-write never lets one sequence see another's
writes).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.kv_cache import (
    BlockAllocator,
    ForwardBatch,
    NoFreeBlocksError,
    PagedKVCache,
    ReservationError,
)


class NumpyBackend:
    def allocate_kv(self, shape: tuple[int, ...], dtype: str) -> np.ndarray:
        return np.zeros(shape, dtype=np.dtype(dtype))


def make_cache(num_blocks: int, block_size: int) -> PagedKVCache:
    return PagedKVCache(NumpyBackend(), 1, 1, 1, num_blocks, block_size)


def key_value(tokens: list[int], i: int) -> float:
    """The stand-in for a key: determined by the tokens up to and including position i."""
    return float(hash(tuple(tokens[: i + 1])) % 10**6)


def write(cache: PagedKVCache, seq: str, tokens: list[int], new: list[int]) -> None:
    """Append `new` to a sequence whose tokens so far are `tokens`."""
    slots = cache.reserve(seq, len(new))
    full = tokens + new
    cache.k.reshape(-1)[slots] = [key_value(full, i) for i in range(len(tokens), len(full))]
    cache.commit(seq, new)


def read(cache: PagedKVCache, seq: str) -> list[float]:
    table, size = cache.block_table(seq), cache.block_size
    return [float(cache.k[0, table[p // size], p % size, 0, 0]) for p in range(cache.length(seq))]


def check_invariants(cache: PagedKVCache, model: dict[str, list[int]]) -> None:
    alloc = cache.allocator
    held = Counter(b for seq in model for b in cache.block_table(seq))
    for block in range(alloc.num_blocks):
        assert alloc.refcount[block] == held[block], f"block {block}"
    free = list(alloc._never_cached) + list(alloc._evictable)
    assert len(free) == len(set(free)), "a block is free twice"
    assert not set(free) & set(held), "a held block is on the free list"
    assert len(free) + len(held) == alloc.num_blocks, "a block leaked"
    for seq, tokens in model.items():
        assert cache.length(seq) == len(tokens)
        assert len(cache.block_table(seq)) == cache.blocks_for(len(tokens))
        expected = [key_value(tokens, i) for i in range(len(tokens))]
        assert read(cache, seq) == expected, f"sequence {seq} reads values not its own"


OPS = st.lists(
    st.tuples(
        st.sampled_from(["add", "fork", "append", "free", "rollback", "failed_step", "speculate"]),
        st.integers(0, 10**6),
        st.integers(1, 40),
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(ops=OPS, block_size=st.sampled_from([1, 4, 16]), num_blocks=st.integers(1, 24))
def test_random_operations_keep_the_cache_consistent(ops, block_size, num_blocks):
    cache = make_cache(num_blocks, block_size)
    model: dict[str, list[int]] = {}
    for step, (op, pick, n) in enumerate(ops):
        names = sorted(model)
        name = f"s{step}"
        if op == "add" or not names:
            # Prompts from a two-token vocabulary, so that prefixes repeat and hit the cache.
            rng = np.random.default_rng(pick)
            prompt = [int(t) for t in rng.integers(0, 2, size=n)]
            cached = cache.add_sequence(name, prompt)
            assert cached % block_size == 0 and cached < len(prompt)
            try:
                write(cache, name, prompt[:cached], prompt[cached:])
            except NoFreeBlocksError:
                cache.free(name)
                continue
            model[name] = prompt
        elif op == "fork":
            parent = names[pick % len(names)]
            cache.fork(parent, name)
            model[name] = list(model[parent])
        elif op == "append":
            name = names[pick % len(names)]
            new = [(pick >> i) & 1 for i in range(min(n, 5))]
            free_before = cache.allocator.num_free
            try:
                write(cache, name, model[name], new)
            except NoFreeBlocksError:
                assert cache.allocator.num_free == free_before  # all or nothing
                continue
            model[name] = model[name] + new
        elif op == "speculate":  # proposed tokens written, the rejected tail truncated
            name = names[pick % len(names)]
            proposed = [(pick >> i) & 1 for i in range(min(n, 6))]
            try:
                write(cache, name, model[name], proposed)
            except NoFreeBlocksError:
                continue
            kept = len(model[name]) + pick % (len(proposed) + 1)
            cache.truncate(name, kept)
            model[name] = (model[name] + proposed)[:kept]
        elif op == "rollback":  # a pass that reserved slots and then failed
            name = names[pick % len(names)]
            table, free = cache.block_table(name), cache.allocator.num_free
            try:
                cache.reserve(name, n)
            except NoFreeBlocksError:
                continue
            cache.rollback(name)
            after = cache.block_table(name)
            assert cache.length(name) == len(model[name])
            assert len(after) == len(table) and after[:-1] == table[:-1]
            copied = after != table  # a shared partial block was copied on write: it stays
            assert cache.allocator.num_free == free - int(copied)
        elif op == "failed_step":  # the last chunk's reservation fails: all roll back
            chosen = names[: 1 + pick % len(names)]
            before = {m: (cache.length(m), len(cache.block_table(m))) for m in chosen}
            free_before = cache.allocator.num_free
            chunks = [(m, [1] * n) for m in chosen] + [("missing", [1])]
            with pytest.raises(ReservationError) as caught:
                ForwardBatch.build(cache, chunks)
            failed = caught.value.seq_id  # "missing", unless blocks ran out before it
            assert failed == "missing" or isinstance(caught.value.__cause__, NoFreeBlocksError)
            after = {m: (cache.length(m), len(cache.block_table(m))) for m in chosen}
            assert after == before
            assert cache.allocator.num_free <= free_before  # only copy-on-write copies stay
        else:
            name = names[pick % len(names)]
            cache.free(name)
            del model[name]
        check_invariants(cache, model)
    for name in list(model):
        cache.free(name)
    assert cache.allocator.num_free == num_blocks
    assert not cache.allocator.refcount.any()


def test_prefix_hit_reuses_full_blocks_and_leaves_one_token_to_compute():
    cache = make_cache(8, 4)
    prompt = list(range(10))
    assert cache.add_sequence("a", prompt) == 0
    write(cache, "a", [], prompt)
    cache.free("a")
    assert cache.add_sequence("b", prompt) == 8  # two full blocks of four
    assert cache.add_sequence("c", prompt[:8]) == 4  # the last token is always computed
    assert cache.add_sequence("d", [0, 1, 2, 9, 9]) == 0  # first block differs


def test_least_recently_freed_cached_block_is_evicted_first():
    cache = make_cache(4, 2)
    for name, prompt in (("a", [1, 1, 1]), ("b", [2, 2, 2])):
        cache.add_sequence(name, prompt)
        write(cache, name, [], prompt)
    cache.free("a")  # a's full block becomes evictable before b's
    cache.free("b")
    cache.add_sequence("c", [3] * 5)
    write(cache, "c", [], [3] * 5)  # two never-cached blocks, then evicts a's full block
    assert cache.add_sequence("b2", [2, 2, 2]) == 2
    assert cache.add_sequence("a2", [1, 1, 1]) == 0


def test_fork_then_write_copies_the_shared_partial_block():
    cache = make_cache(6, 4)
    cache.add_sequence("p", [5, 6])
    write(cache, "p", [], [5, 6])
    cache.fork("p", "c")
    assert cache.block_table("c") == cache.block_table("p")
    write(cache, "c", [5, 6], [7])
    write(cache, "p", [5, 6], [8])
    assert cache.block_table("c") != cache.block_table("p")
    assert read(cache, "p") == [key_value([5, 6, 8], i) for i in range(3)]
    assert read(cache, "c") == [key_value([5, 6, 7], i) for i in range(3)]


def test_double_release_is_an_error():
    alloc = BlockAllocator(1)
    block = alloc.allocate()
    alloc.release(block)
    with pytest.raises(RuntimeError):
        alloc.release(block)


def test_forward_batch_describes_each_sequence():
    cache = make_cache(16, 4)
    cache.add_sequence("a", [1] * 6)
    write(cache, "a", [], [1] * 6)
    cache.add_sequence("b", [2, 3])
    batch = ForwardBatch.build(cache, [("a", [4]), ("b", [2, 3])])
    assert batch.query_start.tolist() == [0, 1, 3]
    assert batch.context_lens.tolist() == [7, 2]
    assert batch.positions.tolist() == [6, 0, 1]
    assert batch.logits_rows.tolist() == [0, 2]
    table_a = cache.block_table("a")
    assert batch.slots[0] == table_a[1] * 4 + 2
    assert batch.block_tables[0, :2].tolist() == table_a


def test_usage_counts_shared_blocks_once():
    cache = make_cache(8, 4)
    cache.add_sequence("a", [])
    cache.reserve("a", 6)
    cache.commit("a", [1, 2, 3, 4, 5, 6])
    cache.fork("a", "b")
    assert cache.usage() == (6, 8)  # two blocks, the second half full
    cache.reserve("b", 1)  # copy-on-write of the shared partial block
    cache.commit("b", [7])
    assert cache.usage() == (6 + 3, 12)


def test_a_64k_token_prefix_is_reused_with_fixed_size_keys():
    """Keys chained per block stay one integer at any depth (nested tuples made hashing grow
    with depth and comparing them recurse until a ~16k-token prefix raised RecursionError)."""
    tokens = [int(t) for t in np.random.default_rng(0).integers(0, 50_000, 65_536 + 1)]
    cache = PagedKVCache(NumpyBackend(), 1, 1, 1, 65_536 // 16 + 2, 16)
    cache.add_sequence("first", tokens)
    cache.reserve("first", len(tokens))
    cache.commit("first", tokens)
    keys = cache._seqs["first"].keys
    assert len(keys) == 4096 and all(type(k) is int for k in keys)
    cache.free("first")
    assert cache.add_sequence("again", tokens) == 65_536
    assert cache.block_table("again") == list(range(4096))  # the very same blocks
    changed = tokens[:-2] + [tokens[-2] + 1, tokens[-1]]  # differs in the last full block
    assert cache.add_sequence("other", changed) == 65_536 - 16


def test_truncating_into_a_full_block_drops_it_from_the_prefix_index():
    """Rejected speculative tokens filled a block, then the block is overwritten: the prefix
    cache must not hand out its old contents; blocks past the end keep their (true) keys."""
    cache = make_cache(8, 4)
    cache.add_sequence("a", [1, 2])
    write(cache, "a", [], [1, 2])
    write(cache, "a", [1, 2], [3, 4, 5, 6, 7])  # blocks (1 2 3 4) and (5 6 7 .) proposed
    cache.truncate("a", 3)  # 4 and beyond rejected
    assert cache.length("a") == 3 and len(cache.block_table("a")) == 1
    write(cache, "a", [1, 2, 3], [9])  # the first block now holds 1 2 3 9
    assert cache.add_sequence("b", [1, 2, 3, 4, 0]) == 0  # (1 2 3 4) is gone
    assert cache.add_sequence("c", [1, 2, 3, 9, 0]) == 4
    assert read(cache, "a") == [key_value([1, 2, 3, 9], i) for i in range(4)]
    check_invariants(cache, {"a": [1, 2, 3, 9], "b": [], "c": [1, 2, 3, 9]})
