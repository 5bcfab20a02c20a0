"""Oracle tests: every EMR operator against a plain per-element Python loop on small vectors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from matu_lib.modulators import (
    Modulators,
    elect_magnitude,
    elect_sign,
    mask_nbytes,
    pack_mask,
    reconstruct,
    rescaler,
    task_mask,
    unified_vector,
    unify,
    unify_modulators,
    unpack_mask,
)

BIG = 2**22


# ----------------------------------------------------------------------------- reference (oracle)


def ref_emr(taus: list[list[float]], rule: str = "sum", tie: str = "negative", magnitude: str = "max"):
    """EMR-Merging written out one parameter at a time, straight from the formulas."""
    n_tasks, d = len(taus), len(taus[0])
    tie_value = {"negative": -1, "positive": 1, "zero": 0}[tie]
    sign, mu = [], []
    for j in range(d):
        column = [taus[i][j] for i in range(n_tasks)]
        if rule == "sum":
            stat = math.fsum(column)
        else:
            stat = sum(1 for x in column if x > 0) - sum(1 for x in column if x < 0)
        s = 1 if stat > 0 else -1 if stat < 0 else tie_value
        sign.append(s)
        agreeing = [abs(x) for x in column if x * s > 0]
        if magnitude == "max":
            mu.append(max(agreeing, default=0.0))
        else:
            mu.append(math.fsum(agreeing) / len(agreeing) if agreeing else 0.0)
    unified = [s * m for s, m in zip(sign, mu)]
    masks = [[taus[i][j] * sign[j] > 0 for j in range(d)] for i in range(n_tasks)]
    rescalers = []
    for i in range(n_tasks):
        num = math.fsum(abs(x) for x in taus[i])
        den = math.fsum(abs(u) for u, m in zip(unified, masks[i]) if m)
        rescalers.append(num / den if den > 0 else 1.0)
    return sign, unified, masks, rescalers


def integer_vectors(n_tasks: int, d: int, seed: int) -> list[torch.Tensor]:
    """Values in {-2..2}: plenty of exact zeros, ties (+1 + -1 = 0) and equal magnitudes, and every
    sum is exact in float32, so chunking and order must not change any result bit."""
    g = torch.Generator().manual_seed(seed)
    vs = [torch.randint(-2, 3, (d,), generator=g).float() for _ in range(n_tasks)]
    for v in vs:  # an all-zero column and a +1/-1 tie column
        v[0] = 0.0
    vs[0][1], vs[1][1] = 1.0, -1.0
    for v in vs[2:]:
        v[1] = 0.0
    return vs


def float_vectors(n_tasks: int, d: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    vs = [torch.randn(d, generator=g) for _ in range(n_tasks)]
    for v in vs:
        v[torch.rand(d, generator=g) < 0.2] = 0.0  # exact zeros
    return vs


def as_lists(vs: list[torch.Tensor]) -> list[list[float]]:
    return [v.tolist() for v in vs]


CASES = [(integer_vectors, 4, 37, 0), (integer_vectors, 2, 50, 1), (float_vectors, 5, 41, 2), (float_vectors, 1, 20, 3)]


# ----------------------------------------------------------------------------- against the oracle


@pytest.mark.parametrize("make,n_tasks,d,seed", CASES)
@pytest.mark.parametrize("rule", ["sum", "majority"])
@pytest.mark.parametrize("tie", ["negative", "positive", "zero"])
def test_operators_match_reference(make, n_tasks, d, seed, rule, tie):
    vs = make(n_tasks, d, seed)
    ref_sign, ref_unified, ref_masks, ref_rescalers = ref_emr(as_lists(vs), rule, tie)

    sign = elect_sign(vs, rule, tie)
    assert sign.dtype == torch.int8
    assert sign.tolist() == ref_sign
    assert elect_magnitude(vs, sign).tolist() == [abs(u) for u in ref_unified]
    assert unified_vector(vs, rule, tie).tolist() == ref_unified

    unified, masks, rescalers = unify(vs, rule, tie)
    assert unified.dtype == vs[0].dtype
    assert unified.tolist() == ref_unified
    for i, v in enumerate(vs):
        assert masks[i].dtype == torch.bool
        assert masks[i].tolist() == ref_masks[i]
        assert task_mask(v, unified).tolist() == ref_masks[i]  # sign of tau_u gives the same mask
        assert rescalers[i] == pytest.approx(ref_rescalers[i], rel=1e-6)
        assert rescaler(v, masks[i], unified) == pytest.approx(ref_rescalers[i], rel=1e-6)


@pytest.mark.parametrize("make,n_tasks,d,seed", CASES)
@pytest.mark.parametrize("rule", ["sum", "majority"])
def test_mean_magnitude_matches_reference(make, n_tasks, d, seed, rule):
    vs = make(n_tasks, d, seed)
    _, ref_unified, ref_masks, ref_rescalers = ref_emr(as_lists(vs), rule, "negative", magnitude="mean")
    _, max_unified, _, _ = ref_emr(as_lists(vs), rule, "negative", magnitude="max")
    sign = elect_sign(vs, rule)
    assert elect_magnitude(vs, sign, magnitude="mean").tolist() == pytest.approx(
        [abs(u) for u in ref_unified], rel=1e-6
    )
    assert unified_vector(vs, rule, magnitude="mean").tolist() == pytest.approx(ref_unified, rel=1e-6)
    unified, masks, rescalers = unify(vs, rule, magnitude="mean")
    assert unified.tolist() == pytest.approx(ref_unified, rel=1e-6)
    assert [m.tolist() for m in masks] == ref_masks  # the magnitude rule never changes the masks
    assert rescalers == pytest.approx(ref_rescalers, rel=1e-6)
    if n_tasks > 1:  # with several agreeing tasks the mean is really below the max somewhere
        assert any(abs(a) < abs(b) - 1e-6 for a, b in zip(ref_unified, max_unified))
    u_small, m_small, r_small = unify(vs, rule, magnitude="mean", chunk_size=7)
    assert torch.equal(u_small, unified) and all(torch.equal(a, b) for a, b in zip(m_small, masks))
    for i, v in enumerate(vs):  # L1 restored, as with the max
        recon = reconstruct(unified, masks[i], rescalers[i])
        if masks[i].any():
            assert float(recon.abs().sum()) == pytest.approx(float(v.abs().sum()), rel=1e-5)


def test_unknown_magnitude_is_refused():
    with pytest.raises(ValueError, match="unknown magnitude 'median'"):
        unify([torch.ones(3)], magnitude="median")


def test_tie_rules_on_crafted_columns():
    # column 0: +1 and -1 tie; column 1: all zero; column 2: clear positive
    vs = [torch.tensor([1.0, 0.0, 2.0]), torch.tensor([-1.0, 0.0, 1.0])]
    assert elect_sign(vs, tie="negative").tolist() == [-1, -1, 1]  # EMR's code: sign(0) -> -1
    assert elect_sign(vs, tie="positive").tolist() == [1, 1, 1]
    assert elect_sign(vs, tie="zero").tolist() == [0, 0, 1]
    assert unified_vector(vs, tie="negative").tolist() == [-1.0, 0.0, 2.0]
    assert unified_vector(vs, tie="positive").tolist() == [1.0, 0.0, 2.0]
    assert unified_vector(vs, tie="zero").tolist() == [0.0, 0.0, 2.0]
    _, masks, _ = unify(vs, tie="zero")
    assert masks[0].tolist() == [False, False, True] and masks[1].tolist() == [False, False, True]


def test_majority_and_sum_rules_differ():
    # one large positive update against two small negative ones
    vs = [torch.tensor([3.0]), torch.tensor([-1.0]), torch.tensor([-1.0])]
    assert elect_sign(vs, rule="sum").tolist() == [1]
    assert elect_sign(vs, rule="majority").tolist() == [-1]
    assert unified_vector(vs, rule="sum").tolist() == [3.0]
    assert unified_vector(vs, rule="majority").tolist() == [-1.0]


# ----------------------------------------------------------------------------- structural properties


@pytest.mark.parametrize("chunk_size", [1, 3, 8, 13])
@pytest.mark.parametrize("pack", [False, True])
def test_chunked_equals_unchunked(chunk_size, pack):
    vs = integer_vectors(5, 101, seed=4) if not pack else float_vectors(5, 101, seed=4)
    u_big, m_big, r_big = unify(vs, chunk_size=BIG, pack=pack)
    u, m, r = unify(vs, chunk_size=chunk_size, pack=pack)
    assert torch.equal(u, u_big)
    assert all(torch.equal(a, b) for a, b in zip(m, m_big))
    assert r == pytest.approx(r_big, rel=1e-6)
    assert torch.equal(elect_sign(vs, chunk_size=chunk_size), elect_sign(vs))
    assert torch.equal(unified_vector(vs, chunk_size=chunk_size), u_big)
    assert rescaler(vs[0], m[0], u, chunk_size=chunk_size) == pytest.approx(r_big[0], rel=1e-6)


@pytest.mark.parametrize("rule", ["sum", "majority"])
def test_permutation_invariance(rule):
    vs = integer_vectors(6, 64, seed=5)
    unified, masks, rescalers = unify(vs, rule)
    perm = [3, 0, 5, 1, 4, 2]
    u_p, m_p, r_p = unify([vs[p] for p in perm], rule)
    assert torch.equal(u_p, unified)
    for k, p in enumerate(perm):  # masks and rescalers follow their task
        assert torch.equal(m_p[k], masks[p])
        assert r_p[k] == rescalers[p]


@pytest.mark.parametrize("make,n_tasks,d,seed", CASES)
def test_rescalers_restore_l1_norm(make, n_tasks, d, seed):
    vs = make(n_tasks, d, seed)
    unified, masks, rescalers = unify(vs)
    for v, m, r in zip(vs, masks, rescalers):
        if v.abs().sum() > 0:  # a zero task is the documented 0/0 case
            rec = reconstruct(unified, m, r)
            assert rec.abs().sum().item() == pytest.approx(v.abs().sum().item(), rel=1e-6)


def test_single_task_is_lossless():
    v = float_vectors(1, 1000, seed=6)[0]
    unified, masks, rescalers = unify([v])
    assert rescalers == [1.0]
    assert torch.equal(unified, v)
    assert torch.equal(reconstruct(unified, masks[0], rescalers[0]), v)
    assert torch.equal(reconstruct(unified, pack_mask(masks[0]), rescalers[0]), v)


def test_rescaler_zero_over_zero_is_one():
    zero = torch.zeros(5)
    opposed = torch.tensor([-1.0, -1.0, 0.0, 0.0, 0.0])  # disagrees with the elected sign everywhere
    big = torch.tensor([4.0, 4.0, 0.0, 1.0, 0.0])
    unified, masks, rescalers = unify([zero, opposed, big])
    assert not masks[0].any() and not masks[1].any()
    assert rescalers[0] == 1.0 and rescalers[1] == 1.0
    assert math.isfinite(rescalers[2])
    assert rescaler(zero, masks[0], unified) == 1.0
    assert torch.equal(reconstruct(unified, masks[1], rescalers[1]), torch.zeros(5))


def test_ablation_switches():
    vs = float_vectors(3, 50, seed=7)
    unified, masks, rescalers = unify(vs, use_masks=False, use_rescalers=False)
    assert all(m.all() for m in masks) and rescalers == [1.0, 1.0, 1.0]
    _, masks, rescalers = unify(vs, use_masks=False)
    for v, m, r in zip(vs, masks, rescalers):  # rescalers fit the all-ones masks actually used
        assert reconstruct(unified, m, r).abs().sum().item() == pytest.approx(v.abs().sum().item(), rel=1e-6)


def test_modulators_bundle():
    vs = float_vectors(3, 29, seed=8)
    unified, mods = unify_modulators(vs)
    packed = mods.packed()
    assert len(packed) == 3 and packed.masks[0].dtype == torch.uint8
    assert packed.nbytes_per_task == mask_nbytes(29) + 4
    for i in range(3):
        assert torch.equal(packed.mask(i), mods.masks[i])
        assert torch.equal(packed.reconstruct(unified, i), mods.reconstruct(unified, i))
    with pytest.raises(ValueError, match="masks but"):
        Modulators(mods.masks, [1.0], 29)
    with pytest.raises(ValueError, match="mask 0"):
        Modulators([torch.zeros(28, dtype=torch.bool)], [1.0], 29)


def test_dtype_is_preserved():
    vs = [v.double() for v in float_vectors(3, 20, seed=9)]
    unified, _, _ = unify(vs)
    assert unified.dtype == torch.float64
    assert unified.tolist() == ref_emr(as_lists(vs))[1]


# ----------------------------------------------------------------------------- bit packing


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 15, 16, 17, 1000, 1_000_003])
def test_pack_unpack_round_trip(n):
    g = torch.Generator().manual_seed(n)
    mask = torch.rand(n, generator=g) < 0.5
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == mask_nbytes(n) == math.ceil(n / 8)
    assert torch.equal(unpack_mask(packed, n), mask)
    # bit order oracle: numpy's little-endian packbits
    assert np.array_equal(packed.numpy(), np.packbits(mask.numpy(), bitorder="little"))


def test_pack_all_ones_and_zeros():
    assert pack_mask(torch.ones(9, dtype=torch.bool)).tolist() == [255, 1]
    assert pack_mask(torch.zeros(9, dtype=torch.bool)).tolist() == [0, 0]


def test_unpack_rejects_wrong_lengths():
    packed = pack_mask(torch.ones(9, dtype=torch.bool))
    with pytest.raises(ValueError, match="needs 1"):
        unpack_mask(packed, 8)
    with pytest.raises(ValueError, match="set bits beyond length 7"):
        unpack_mask(pack_mask(torch.ones(8, dtype=torch.bool)), 7)
    with pytest.raises(ValueError, match="uint8"):
        unpack_mask(packed.int(), 9)
    with pytest.raises(ValueError, match="bool"):
        pack_mask(torch.ones(3))
    with pytest.raises(ValueError, match=">= 0"):
        mask_nbytes(-1)


# ----------------------------------------------------------------------------- invalid inputs


@pytest.mark.parametrize(
    "vectors,message",
    [
        ([], "empty list"),
        ([torch.zeros(3), torch.zeros(4)], "mismatched lengths"),
        ([torch.zeros(2, 2)], "must be 1-D"),
        ([torch.zeros(0)], "length 0"),
        ([torch.zeros(3, dtype=torch.int64)], "floating-point"),
        ([torch.zeros(3), torch.zeros(3, dtype=torch.float64)], "mismatched dtypes"),
        ([torch.zeros(3), torch.tensor([0.0, float("nan"), 1.0])], "task vector 1 contains NaN/Inf .*index 1"),
        ([torch.tensor([float("inf"), 0.0, 0.0])], "task vector 0 contains NaN/Inf"),
        (torch.zeros(2, 3), "not one stacked tensor"),
        ([[0.0, 1.0]], "must be a torch.Tensor"),
    ],
)
def test_invalid_vectors_raise(vectors, message):
    with pytest.raises(ValueError, match=message):
        unify(vectors)
    with pytest.raises(ValueError, match=message):
        elect_sign(vectors, chunk_size=2)


def test_invalid_options_raise():
    vs = [torch.ones(3)]
    with pytest.raises(ValueError, match="unknown election rule"):
        unify(vs, rule="mean")
    with pytest.raises(ValueError, match="unknown tie rule"):
        elect_sign(vs, tie="random")
    with pytest.raises(ValueError, match="chunk_size"):
        unify(vs, chunk_size=0)
    with pytest.raises(ValueError, match="length 3"):
        elect_magnitude(vs, torch.ones(2))
    with pytest.raises(ValueError, match="NaN/Inf"):
        elect_magnitude([torch.tensor([1.0, float("nan"), 0.0])], torch.ones(3))
    with pytest.raises(ValueError, match="length"):
        task_mask(torch.ones(3), torch.ones(4))
    with pytest.raises(ValueError, match="mask has length 2"):
        reconstruct(torch.ones(3), torch.ones(2, dtype=torch.bool), 1.0)
    with pytest.raises(ValueError, match="bool or packed uint8"):
        reconstruct(torch.ones(3), torch.ones(3), 1.0)
    with pytest.raises(ValueError, match="rescaler must be finite"):
        reconstruct(torch.ones(3), torch.ones(3, dtype=torch.bool), float("inf"))
    with pytest.raises(ValueError, match="NaN/Inf"):
        rescaler(torch.tensor([float("nan"), 1.0]), torch.ones(2, dtype=torch.bool), torch.ones(2))
