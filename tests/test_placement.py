"""Placement plans: every layer placed, no budget exceeded, resident whenever it fits."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.cli import main
from offload.placement import (
    ExpertSizes,
    MiB,
    PlacementError,
    PlacementPlan,
    Tier,
    default_cpu_budget,
    default_gpu_budget,
    parse_memory_size,
    plan_placement,
)

sizes = st.lists(st.integers(0, 400), min_size=0, max_size=40)
budget = st.integers(0, 20_000)
fixed = st.integers(0, 3_000)
slots = st.integers(1, 3)


def least(layers: list[int], slot_count: int) -> int:
    """Brute force: the cheapest of keeping layers[:k] resident and streaming the rest."""
    costs = []
    for k in range(len(layers) + 1):
        streamed = layers[k:]
        costs.append(sum(layers[:k]) + min(slot_count, len(streamed)) * max(streamed, default=0))
    return min(costs)


def check_plan(plan: PlacementPlan, layers: list[int], slot_count: int) -> None:
    """Invariants every plan keeps, whatever the budgets."""
    assert len(plan.tiers) == len(layers) and plan.layer_bytes == tuple(layers)
    for charge in (plan.cpu, plan.gpu):
        if charge is not None:
            assert charge.used <= charge.budget
    order = [Tier.DEVICE, Tier.HOST_TO_DEVICE, Tier.HOST, Tier.DISK]
    ranks = [order.index(t) for t in plan.tiers]
    assert ranks == sorted(ranks)  # resident prefix, streamed tail
    to_device = [b for b, t in zip(layers, plan.tiers) if t.streamed]
    from_disk = [b for b, t in zip(layers, plan.tiers) if t is Tier.DISK]
    device = plan.device_buffers if plan.gpu is not None else None
    for buffers, streamed in ((device, to_device), (plan.host_buffers, from_disk)):
        if buffers is not None:
            assert buffers.count == min(slot_count, len(streamed))
            assert buffers.nbytes == max(streamed, default=0)


@given(sizes, fixed, fixed, budget, slots)
def test_cpu_only_plans(layers, non_layer, reserve, cpu, slot_count):
    try:
        plan = plan_placement(
            layers, non_layer, cpu, reserve_bytes=reserve, buffer_slots=slot_count
        )
    except PlacementError as error:
        # impossible only when no split into resident layers and buffers fits
        assert non_layer + reserve + least(layers, slot_count) > cpu
        assert "cannot hold the model" in str(error)
        return
    check_plan(plan, layers, slot_count)
    assert set(plan.tiers) <= {Tier.HOST, Tier.DISK} and plan.gpu is None
    assert plan.fully_resident == (non_layer + reserve + sum(layers) <= cpu)
    assert plan.cpu.resident_layers == sum(b for b, t in zip(layers, plan.tiers) if t is Tier.HOST)
    k = len(plan.layers(Tier.HOST))
    if k < len(layers):  # one more resident layer would not fit
        rest = layers[k + 1 :]
        buffers = min(slot_count, len(rest)) * max(rest, default=0)
        assert non_layer + reserve + sum(layers[: k + 1]) + buffers > cpu


@given(sizes, fixed, fixed, budget, budget, slots)
def test_gpu_plans(layers, non_layer, reserve, gpu, cpu, slot_count):
    try:
        plan = plan_placement(
            layers, non_layer, cpu, gpu_budget=gpu, reserve_bytes=reserve, buffer_slots=slot_count
        )
    except PlacementError:
        return
    check_plan(plan, layers, slot_count)
    assert Tier.HOST not in plan.tiers
    assert plan.cpu.non_layer == plan.cpu.reserve == 0  # the device holds those
    on_device = non_layer + reserve + sum(layers) <= gpu
    assert (plan.tiers == (Tier.DEVICE,) * len(layers)) == on_device
    assert plan.fully_resident == on_device


@given(sizes, budget, slots)
def test_gpu_plan_fails_only_when_streaming_cannot_fit(layers, gpu, slot_count):
    ample_cpu = 2 * sum(layers)
    if 100 + least(layers, slot_count) > gpu:
        with pytest.raises(PlacementError, match="gpu memory budget"):
            plan_placement(layers, 100, ample_cpu, gpu_budget=gpu, buffer_slots=slot_count)
    else:
        plan = plan_placement(layers, 100, ample_cpu, gpu_budget=gpu, buffer_slots=slot_count)
        assert Tier.DISK not in plan.tiers  # host RAM holds whatever the device streams


moe_layers = st.lists(
    st.tuples(st.integers(1, 300), st.lists(st.integers(1, 60), min_size=1, max_size=6)),
    min_size=1,
    max_size=12,
)


@given(moe_layers, fixed, fixed, budget, budget, slots)
def test_mixture_of_experts_plans(moe, non_layer, reserve, gpu, cpu, slot_count):
    """A mixture of experts that fits whole is placed whole; otherwise its layers are placed
    without their experts and every whole slot left holds an expert, one per expert at most,
    with one transient slot unless every expert has its own."""
    dense = [d for d, _ in moe]
    experts = [e for _, layer in moe for e in layer]
    whole = [d + sum(layer) for d, layer in moe]
    sizes = ExpertSizes(tuple(dense), tuple(experts))
    kw = {"gpu_budget": gpu, "reserve_bytes": reserve, "buffer_slots": slot_count}
    try:
        plan = plan_placement(whole, non_layer, cpu, experts=sizes, **kw)
    except PlacementError as error:  # not even the dense parts, one slot and buffers fit
        if "gpu memory budget" in str(error):
            assert non_layer + reserve + max(experts) + least(dense, slot_count) > gpu
        return
    fits_whole = non_layer + reserve + sum(whole) <= gpu
    cache = plan.expert_cache
    assert (cache is None) == fits_whole
    if cache is None:
        check_plan(plan, whole, slot_count)
        assert plan.fully_resident
        return
    check_plan(plan, dense, slot_count)
    slot = max(experts)
    assert cache.slot_bytes == slot and cache.experts == len(experts)
    assert plan.gpu.expert_cache == cache.total and plan.gpu.reserve == reserve
    if cache.slots == len(experts):
        assert cache.transient == 0
    else:
        assert cache.transient == 1 and plan.gpu.used + slot > gpu  # no room for another
    # The dense parts were placed first, as if the transient slot were part of the reserve.
    first = plan_placement(dense, non_layer, cpu, **{**kw, "reserve_bytes": reserve + slot})
    assert first.tiers == plan.tiers


def test_plan_describe_and_buffers():
    plan = plan_placement([10 * MiB] * 6, 5 * MiB, 50 * MiB, reserve_bytes=5 * MiB)
    assert plan.tiers == (Tier.HOST,) * 2 + (Tier.DISK,) * 4
    assert (plan.host_buffers.count, plan.host_buffers.nbytes) == (2, 10 * MiB)
    text = plan.describe()
    assert "2 resident in host RAM (0-1); 4 streamed from disk (2-5)" in text
    assert "host streaming buffers: 2 x 10.0 MiB" in text
    assert "cpu budget 50.0 MiB: used 50.0 MiB" in text


def test_streaming_one_layer_is_never_chosen_over_resident():
    """Two buffers for the last two layers cost as much as keeping them: keep them."""
    plan = plan_placement([10, 10, 10, 10], 0, 40)
    assert plan.fully_resident
    plan = plan_placement([10, 10, 10, 10], 0, 39)
    assert plan.tiers == (Tier.HOST, Tier.DISK, Tier.DISK, Tier.DISK)


@pytest.mark.parametrize(
    ("text", "size"),
    [("512", 512 * MiB), ("512M", 512 * MiB), ("1.5G", 3 * 2**29), ("2GiB", 2**31),
     ("300mb", 300 * MiB), ("64K", 2**16), (" 1T ", 2**40), ("4096B", 4096), ("2kib", 2048)],
)  # fmt: skip
def test_parse_memory_size(text, size):
    assert parse_memory_size(text) == size


@pytest.mark.parametrize("text", ["", "M", "-1G", "1X", "0", "1.2.3G", "0.5B", "1iB"])
def test_parse_memory_size_refuses(text):
    with pytest.raises(ValueError):
        parse_memory_size(text)


def test_default_budgets_keep_a_margin():
    assert default_cpu_budget(available=10 * 2**30) == 9 * 2**30
    assert default_cpu_budget(available=100 * MiB) == 0
    assert default_gpu_budget(80 * 2**30) == 76 * 2**30
    assert 0 < default_cpu_budget()


def test_cli_refuses_bad_memory_size(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--cpu-memory", "lots", "hi"])
    assert exit_info.value.code == 2
    assert "not a memory size" in capsys.readouterr().err
