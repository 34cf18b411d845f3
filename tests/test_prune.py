"""Pruning: exact sparsity and pattern per row, Wanda's choice against numpy, reconstruction."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.quant.prune import keep_mask, parse_pattern, prune_scores, reconstruct

SHAPES = st.tuples(st.sampled_from([1, 3, 17, 64]), st.sampled_from([1, 4, 7, 16, 17, 130]))


@settings(max_examples=60, deadline=None)
@given(shape=SHAPES, sparsity=st.sampled_from([0.0, 0.25, 0.5, 0.7, 1.0]), seed=st.integers(0, 999))
def test_unstructured_keeps_exact_count_per_row_and_the_top_scores(shape, sparsity, seed):
    rng = np.random.default_rng(seed)
    scores = rng.random(shape)
    mask = keep_mask(scores, sparsity)
    keep = shape[1] - round(sparsity * shape[1])
    assert (mask.sum(axis=1) == keep).all()
    for row, kept in zip(scores, mask, strict=True):
        # every kept score is at least every dropped score of the same row
        if kept.any() and (~kept).any():
            assert row[kept].min() >= row[~kept].max()


@settings(max_examples=40, deadline=None)
@given(shape=SHAPES, pattern=st.sampled_from(["2:4", "4:8", "1:4"]), seed=st.integers(0, 999))
def test_n_m_keeps_n_of_every_m_consecutive_inputs(shape, pattern, seed):
    n, m = parse_pattern(pattern)
    rng = np.random.default_rng(seed)
    scores = rng.random(shape)
    mask = keep_mask(scores, 1 - n / m, pattern)
    rows, cols = shape
    full = cols - cols % m
    groups = mask[:, :full].reshape(rows, -1, m)
    assert (groups.sum(axis=2) == n).all()
    score_groups = scores[:, :full].reshape(rows, -1, m)
    kept_min = np.where(groups, score_groups, np.inf).min(axis=2)
    dropped_max = np.where(groups, -np.inf, score_groups).max(axis=2)
    assert (kept_min >= dropped_max).all()
    if cols > full:
        assert (mask[:, full:].sum(axis=1) == -(-(cols - full) * n // m)).all()


def test_wanda_keeps_the_largest_weight_times_input_norm():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 64)).astype(np.float32)
    x = rng.standard_normal((200, 64)) * rng.uniform(0.01, 10, size=64)
    norm = np.linalg.norm(x, axis=0)
    mask = keep_mask(prune_scores(w, "wanda", norm), 0.5)
    # numpy reference: per row, the 32 largest |W| * ||X||
    metric = np.abs(w) * norm[None, :]
    ref = np.zeros_like(mask)
    top = np.argsort(-metric, axis=1)[:, :32]
    np.put_along_axis(ref, top, True, axis=1)
    assert np.array_equal(mask, ref)
    # and it is not magnitude pruning: loud inputs change the choice
    assert not np.array_equal(mask, keep_mask(prune_scores(w, "magnitude"), 0.5))


def test_reconstruction_moves_a_pruned_weight_onto_its_twin_input():
    """Inputs 0 and 1 are (almost) the same signal: pruning weight 0 must add it to weight 1,
    the later column (the update only reaches columns after the pruned one, as in SparseGPT)."""
    rng = np.random.default_rng(0)
    z = rng.standard_normal(500)
    x = np.stack([z, z + 0.01 * rng.standard_normal(500), rng.standard_normal(500)], axis=1)
    w = np.array([[1.0, 2.0, 3.0]], dtype=np.float32)
    rebuilt = reconstruct(w, np.array([[False, True, True]]), x.T @ x, damping=1e-6)
    np.testing.assert_allclose(rebuilt, [[0.0, 3.0, 3.0]], atol=2e-3)


def test_reconstruction_fits_the_outputs_better_than_masking():
    rng = np.random.default_rng(1)
    k = 96
    # low-rank inputs plus noise, like a model's hidden states
    x = rng.standard_normal((1000, 32)) @ rng.standard_normal((32, k))
    x += 0.1 * rng.standard_normal((1000, k))
    w = rng.standard_normal((48, k)).astype(np.float32)
    mask = keep_mask(prune_scores(w, "wanda", np.linalg.norm(x, axis=0)), 0.5)
    rebuilt = reconstruct(w, mask, x.T @ x)
    assert (rebuilt[~mask] == 0).all()
    err_masked = np.linalg.norm(x @ (w - np.where(mask, w, 0)).T)
    err_rebuilt = np.linalg.norm(x @ (w - rebuilt).T)
    assert err_rebuilt < 0.9 * err_masked


@pytest.mark.parametrize("pattern", ["2:2", "0:4", "x", "2-4"])
def test_bad_patterns_are_refused(pattern):
    with pytest.raises(ValueError, match="pattern"):
        parse_pattern(pattern)


def test_n_m_with_a_different_sparsity_is_refused():
    with pytest.raises(ValueError, match="means sparsity 0.5"):
        keep_mask(np.ones((2, 8)), 0.7, "2:4")
