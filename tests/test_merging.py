"""Oracle tests for the merging baselines: each against a naive numpy / per-element reference."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from matu_lib.merging import (
    COEF_GRID,
    LAMBDA_GRID,
    MERGERS,
    MergeResult,
    consensus,
    emr,
    grid,
    select_on_validation,
    select_per_task,
    tall_masks,
    task_arithmetic,
    ties,
)
from matu_lib.modulators import mask_nbytes, unify

BIG = 2**22


def make_vectors(n_tasks: int, d: int, seed: int) -> list[torch.Tensor]:
    """Random floats with exact zeros, an all-zero column, a +x/-x tie and repeated magnitudes."""
    g = torch.Generator().manual_seed(seed)
    vs = [torch.randn(d, generator=g) for _ in range(n_tasks)]
    for v in vs:
        v[torch.rand(d, generator=g) < 0.2] = 0.0
        v[0] = 0.0
        v[2] = 0.5  # equal magnitudes across tasks
    if n_tasks >= 2:
        vs[0][1], vs[1][1] = 0.75, -0.75
        for v in vs[2:]:
            v[1] = 0.0
    return vs


def stack(vs: list[torch.Tensor]) -> np.ndarray:
    return torch.stack(vs).double().numpy()


# ----------------------------------------------------------------------------- references


def ref_ties(M: np.ndarray, k: float) -> np.ndarray:
    """TIES-Merging, transcribed from the authors' code (topk_values_mask, resolve_sign,
    resolve_zero_signs "majority", disjoint_merge), row = task."""
    n, d = M.shape
    keep = int(d * k)
    trimmed = M.copy()
    if keep < d:
        for i in range(n):
            kth = np.sort(np.abs(M[i]))[d - keep - 1]  # (d - keep)-th smallest, 1-based
            trimmed[i] = np.where(np.abs(M[i]) >= kth, M[i], 0.0)
    sign = np.sign(trimmed.sum(axis=0))
    sign[sign == 0] = np.sign(sign.sum())
    out = np.zeros(d)
    for j in range(d):
        agreeing = [trimmed[i, j] for i in range(n) if trimmed[i, j] != 0 and np.sign(trimmed[i, j]) == sign[j]]
        out[j] = sum(agreeing) / len(agreeing) if agreeing else 0.0
    return out


def ref_tall_masks(vs: list[torch.Tensor], mtl: np.ndarray, lams: list[float]) -> list[list[bool]]:
    """m_t = 1[|tau_t| > lam_t * |tau_MTL - tau_t|], per element, given the float32 tau_MTL."""
    masks = []
    for v, lam in zip(vs, lams):
        t = v.numpy()
        masks.append([bool(abs(t[j]) > lam * abs(mtl[j] - t[j])) for j in range(len(t))])
    return masks


# ----------------------------------------------------------------------------- task arithmetic


def test_task_arithmetic_matches_reference():
    vs = make_vectors(4, 53, seed=0)
    res = task_arithmetic(vs, coef=0.3)
    expected = 0.3 * stack(vs).sum(axis=0)
    np.testing.assert_allclose(res.merged.numpy(), expected, rtol=1e-6, atol=1e-7)
    assert res.coef == 0.3 and res.extra_bytes_per_task == 0
    assert all(torch.equal(res.per_task(i), res.merged) for i in range(4))
    with pytest.raises(IndexError):
        res.per_task(4)


# ----------------------------------------------------------------------------- TIES


@pytest.mark.parametrize("k", [0.2, 0.5, 1.0, 0.01])
@pytest.mark.parametrize("seed", [1, 2])
def test_ties_matches_reference(k, seed):
    vs = make_vectors(5, 61, seed)
    res = ties(vs, coef=0.7, k=k)
    np.testing.assert_allclose(res.merged.numpy(), 0.7 * ref_ties(stack(vs), k), rtol=1e-6, atol=1e-7)


def test_ties_crafted():
    # k=1 keeps everything. col0: +2,+4,-1 -> sign +, mean(2,4)=3; col1: +1,-1,0 ties -> sign of the
    # sum of elected signs (+2, so +) -> 1; col2: all zero -> 0; col3: +3,+3,-1 -> 3
    vs = [torch.tensor([2.0, 1.0, 0.0, 3.0]), torch.tensor([4.0, -1.0, 0.0, 3.0]), torch.tensor([-1.0, 0.0, 0.0, -1.0])]
    assert ties(vs, coef=1.0, k=1.0).merged.tolist() == [3.0, 1.0, 0.0, 3.0]
    # with elected signs +,0,0,- the global majority is 0 too, so the tie column is dropped
    vs[0][3], vs[1][3], vs[2][3] = -3.0, -3.0, 1.0
    assert ties(vs, coef=1.0, k=1.0).merged.tolist() == [3.0, 0.0, 0.0, -3.0]


@pytest.mark.parametrize("chunk_size", [1, 3, 8])
def test_ties_chunked_and_permutation_invariant(chunk_size):
    vs = make_vectors(5, 61, seed=3)
    full = ties(vs, coef=0.5, chunk_size=BIG).merged
    assert torch.equal(ties(vs, coef=0.5, chunk_size=chunk_size).merged, full)
    torch.testing.assert_close(ties(vs[::-1], coef=0.5).merged, full, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- TALL masks / consensus


@pytest.mark.parametrize("lam", [0.2, 0.4, 0.6, [0.2, 0.3, 0.5, 0.6]])
def test_tall_masks_formula(lam):
    vs = make_vectors(4, 47, seed=4)
    lams = lam if isinstance(lam, list) else [lam] * 4
    res = tall_masks(vs, lam=lam)
    # tau_MTL is the plain, unscaled sum, and no coefficient is applied to the per-task models
    np.testing.assert_allclose(res.merged.numpy(), stack(vs).sum(axis=0), rtol=1e-6, atol=1e-6)
    assert res.coef == 1.0
    masks = ref_tall_masks(vs, res.merged.numpy(), lams)
    assert res.extra_bytes_per_task == mask_nbytes(47)
    for i in range(4):
        expected = np.where(masks[i], res.merged.numpy(), 0.0)
        assert np.array_equal(res.per_task(i).numpy(), expected)


# Two tasks, three weights, lambda 0.5. By hand (tau_MTL = tau_0 + tau_1 = [1.4, -2.0, 4.0]):
#   task 0, w0: |1.0| > 0.5 * |1.4 - 1.0| = 0.2   yes    w1: |1.0| > 0.5 * |-2.0 - 1.0| = 1.5  no
#           w2: |2.0| > 0.5 * |4.0 - 2.0| = 1.0   yes
#   task 1, w0: |0.4| > 0.5 * |1.4 - 0.4| = 0.5   no     w1: |-3.0| > 0.5 * |-2.0 + 3.0| = 0.5 yes
#           w2: |2.0| > 0.5 * |4.0 - 2.0| = 1.0   yes
# With the old, scaled rule (tau_MTL replaced by 0.3 * sum = [0.42, -0.6, 1.2]) task 0 would also keep w1
# (|1.0| > 0.5 * 1.6 = 0.8) and task 1 would also keep w0 (|0.4| > 0.5 * 0.02 = 0.01): every weight in both masks.
HAND_VECTORS = ([1.0, 1.0, 2.0], [0.4, -3.0, 2.0])


def test_tall_masks_hand_computed_unscaled_rule():
    vs = [torch.tensor(v) for v in HAND_VECTORS]
    res = tall_masks(vs, lam=0.5)
    assert res.merged.tolist() == pytest.approx([1.4, -2.0, 4.0])
    assert res.per_task(0).tolist() == pytest.approx([1.4, 0.0, 4.0])  # theta_0 + m_0 * sum, no coefficient
    assert res.per_task(1).tolist() == pytest.approx([0.0, -2.0, 4.0])


def test_consensus_hand_computed_unscaled_rule():
    vs = [torch.tensor(v) for v in HAND_VECTORS]
    # mask counts [1, 1, 2]: only w2 is selected by >= 2 masks (the scaled rule would count [2, 2, 2] and
    # keep all three), and coef scales what is kept: 0.3 * 4.0
    assert consensus(vs, coef=0.3, lam=0.5, k=2).merged.tolist() == pytest.approx([0.0, 0.0, 1.2])
    assert consensus(vs, coef=0.3, lam=0.5, k=1).merged.tolist() == pytest.approx([0.42, -0.6, 1.2])
    assert consensus(vs, coef=1.0, lam=0.5, k=3).merged.tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("k", [0, 1, 2, 3, 5])
def test_consensus_keeps_weights_in_at_least_k_masks(k):
    vs = make_vectors(4, 47, seed=5)
    lams = [0.2, 0.4, 0.4, 0.6]
    res = consensus(vs, coef=0.4, lam=lams, k=k)
    mtl = tall_masks(vs, lam=lams).merged.numpy()
    masks = ref_tall_masks(vs, mtl, lams)
    counts = np.sum(np.array(masks), axis=0)
    np.testing.assert_allclose(res.merged.numpy(), np.where(counts >= k, 0.4 * mtl, 0.0), rtol=1e-6, atol=0)
    assert res.extra_bytes_per_task == 0 and res.coef == 0.4
    assert all(torch.equal(res.per_task(i), res.merged) for i in range(4))
    if k == 0:  # k=0 keeps everything: task arithmetic
        torch.testing.assert_close(res.merged, task_arithmetic(vs, coef=0.4).merged)


def test_consensus_crafted():
    # tau_MTL = sum = [2, 5.1]. col0: both tasks dominate their own half -> 2 masks; col1: only task 0 -> 1 mask
    vs = [torch.tensor([1.0, 5.0]), torch.tensor([1.0, 0.1])]
    tall = tall_masks(vs, lam=0.5)
    assert tall.per_task(0).tolist() == pytest.approx([2.0, 5.1])
    assert tall.per_task(1).tolist() == pytest.approx([2.0, 0.0])
    assert consensus(vs, coef=1.0, lam=0.5, k=2).merged.tolist() == pytest.approx([2.0, 0.0])


@pytest.mark.parametrize("method", [tall_masks, consensus])
@pytest.mark.parametrize("chunk_size", [1, 3, 8])
def test_tall_and_consensus_chunked_and_permutation(method, chunk_size):
    vs = make_vectors(4, 45, seed=6)
    kwargs = {"lam": 0.3} if method is tall_masks else {"lam": 0.3, "coef": 0.3}
    full = method(vs, chunk_size=BIG, **kwargs)
    res = method(vs, chunk_size=chunk_size, **kwargs)
    assert torch.equal(res.merged, full.merged)
    assert all(torch.equal(res.per_task(i), full.per_task(i)) for i in range(4))
    perm = [2, 0, 3, 1]
    permuted = method([vs[p] for p in perm], **kwargs)
    torch.testing.assert_close(permuted.merged, full.merged)
    for k, p in enumerate(perm):
        torch.testing.assert_close(permuted.per_task(k), full.per_task(p))


def test_tall_lambda_is_chosen_per_task():
    # tau_MTL = [2.9, 5.0]. Task 0 keeps w0 while lam < |0.9| / |2.0| = 0.45, i.e. for 0.2-0.4; task 1 keeps w1
    # while lam < |1.0| / |4.0| = 0.25, i.e. only for 0.2. Task 0's validation prefers w0 dropped, task 1's
    # prefers w1 kept, so task 0 must get 0.5 (the earliest of its two best) and task 1 gets 0.2.
    vs = [torch.tensor([0.9, 4.0]), torch.tensor([2.0, 1.0])]
    wanted = [torch.tensor([0.0, 5.0]), torch.tensor([2.9, 5.0])]

    def val_score(res: MergeResult, i: int) -> float:
        return -float((res.per_task(i) - wanted[i]).abs().sum())

    best, scores, table = select_per_task(val_score, grid(lam=LAMBDA_GRID), functools.partial(tall_masks, vs), 2)
    assert best == [{"lam": 0.5}, {"lam": 0.2}]
    assert scores == pytest.approx([0.0, 0.0])
    assert [kw for kw, _ in table] == [{"lam": x} for x in LAMBDA_GRID]
    assert table[0][1][0] == pytest.approx(-2.9)  # lam 0.2: task 0 still keeps w0
    final = tall_masks(vs, lam=[b["lam"] for b in best])
    assert final.per_task(0).tolist() == pytest.approx([0.0, 5.0])
    assert final.per_task(1).tolist() == pytest.approx([2.9, 5.0])
    # one lambda for all tasks cannot serve both: the best shared choice loses on one task
    shared, shared_score, _ = select_on_validation(
        lambda r: val_score(r, 0) + val_score(r, 1), grid(lam=LAMBDA_GRID), functools.partial(tall_masks, vs)
    )
    assert shared_score < 0


def test_select_per_task_errors():
    build = functools.partial(tall_masks, [torch.ones(2)])
    with pytest.raises(ValueError, match="no candidates"):
        select_per_task(lambda r, i: 1.0, [], build, 1)
    with pytest.raises(ValueError, match="NaN for task 0"):
        select_per_task(lambda r, i: float("nan"), grid(lam=(0.2,)), build, 1)


# ----------------------------------------------------------------------------- EMR


def test_emr_wraps_unify():
    vs = make_vectors(3, 40, seed=7)
    res = emr(vs)
    unified, masks, rescalers = unify(vs)
    assert torch.equal(res.merged, unified) and res.coef == 1.0
    assert res.extra_bytes_per_task == mask_nbytes(40) + 4
    for i, v in enumerate(vs):
        expected = torch.where(masks[i], unified * rescalers[i], 0)
        assert torch.equal(res.per_task(i), expected)
        assert res.per_task(i).abs().sum().item() == pytest.approx(v.abs().sum().item(), rel=1e-6)
    assert emr(vs, use_masks=False).extra_bytes_per_task == 4
    assert emr(vs, use_masks=False, use_rescalers=False).extra_bytes_per_task == 0


def test_emr_single_task_is_lossless():
    v = make_vectors(1, 33, seed=8)[0]
    assert torch.equal(emr([v]).per_task(0), v)


# ----------------------------------------------------------------------------- registry, grids, selection


def test_registry_one_signature():
    vs = make_vectors(3, 20, seed=9)
    options = {"emr": {}, "tall_masks": {"lam": 0.4}, "consensus": {"coef": 0.5, "lam": 0.4}}
    for name, fn in MERGERS.items():
        res = fn(vs, **options.get(name, {"coef": 0.5}))
        assert isinstance(res, MergeResult)
        assert res.merged.shape == (20,) and res.per_task(2).shape == (20,)
    assert set(MERGERS) == {"task_arithmetic", "ties", "tall_masks", "consensus", "emr"}


def test_grids():
    assert COEF_GRID == (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    assert LAMBDA_GRID == (0.2, 0.3, 0.4, 0.5, 0.6)
    combos = grid(coef=COEF_GRID, lam=LAMBDA_GRID)
    assert len(combos) == 50 and combos[0] == {"coef": 0.1, "lam": 0.2} and combos[-1] == {"coef": 1.0, "lam": 0.6}


def test_select_on_validation_picks_best_and_scores_all():
    vs = make_vectors(3, 20, seed=10)
    target = 0.6 * torch.stack(vs).sum(0)  # "validation" metric peaks at coef 0.6

    def evaluate(res: MergeResult) -> float:
        return -float((res.merged - target).norm())

    best, score, scores = select_on_validation(evaluate, grid(coef=COEF_GRID), functools.partial(task_arithmetic, vs))
    assert best == {"coef": 0.6}
    assert len(scores) == len(COEF_GRID) and score == max(s for _, s in scores)


def test_select_on_validation_ties_and_errors():
    build = functools.partial(task_arithmetic, [torch.ones(2)])
    best, _, _ = select_on_validation(lambda r: 1.0, grid(coef=(0.3, 0.1)), build)
    assert best == {"coef": 0.3}  # equal scores: earliest candidate wins
    with pytest.raises(ValueError, match="no candidates"):
        select_on_validation(lambda r: 1.0, [], build)
    with pytest.raises(ValueError, match="NaN"):
        select_on_validation(lambda r: float("nan"), grid(coef=(0.3,)), build)


# ----------------------------------------------------------------------------- invalid inputs


@pytest.mark.parametrize("name", sorted(MERGERS))
@pytest.mark.parametrize(
    "vectors,message",
    [
        ([], "empty list"),
        ([torch.zeros(3), torch.zeros(4)], "mismatched lengths"),
        ([torch.zeros(2, 2)], "must be 1-D"),
        ([torch.zeros(3), torch.tensor([0.0, float("nan"), 1.0])], "task vector 1 contains NaN/Inf"),
        ([torch.tensor([float("inf"), 1.0, 0.0])], "task vector 0 contains NaN/Inf"),
    ],
)
def test_invalid_vectors_raise(name, vectors, message):
    kwargs = {"emr": {}, "tall_masks": {"lam": 0.4}, "consensus": {"coef": 0.5, "lam": 0.4}}.get(name, {"coef": 0.5})
    with pytest.raises(ValueError, match=message):
        MERGERS[name](vectors, **kwargs)


def test_invalid_options_raise():
    vs = [torch.ones(4), torch.ones(4)]
    with pytest.raises(ValueError, match="coef"):
        task_arithmetic(vs, coef=float("nan"))
    with pytest.raises(TypeError):
        ties(vs)  # coef is required: pick it on validation
    with pytest.raises(ValueError, match="kept fraction"):
        ties(vs, coef=0.5, k=0.0)
    with pytest.raises(ValueError, match="2 lambdas for"):
        tall_masks(vs + [torch.ones(4)], lam=[0.2, 0.3])
    with pytest.raises(ValueError, match="lambda"):
        tall_masks(vs, lam=-1.0)
    with pytest.raises(TypeError):
        tall_masks(vs)  # lambda is required: pick it per task on validation
    with pytest.raises(TypeError):
        tall_masks(vs, lam=0.4, coef=0.5)  # TALL evaluates the unscaled sum: no coefficient to pass
    with pytest.raises(ValueError, match="k must be"):
        consensus(vs, coef=0.5, lam=0.4, k=-1)


@pytest.mark.parametrize("build", [lambda vs: tall_masks(vs, lam=0.4), lambda vs: emr(vs)])
def test_one_shot_download_is_serialised_with_its_per_task_state(build):
    """A one-shot merger's download bytes are a serialised Payload's: the merged vector plus, per task, the
    mask and rescaler the client needs to rebuild exactly the vector the merger evaluates (``per_task``)."""
    from matu_lib.communication import Payload
    from matu_lib.methods import merge_download

    g = torch.Generator().manual_seed(3)
    vs = [torch.randn(45, generator=g) for _ in range(3)]
    res = build(vs)
    index = {"a": 0, "b": 1, "c": 2}
    down = merge_download(res, 4, ("a", "c"), index)
    sizes = down.nbytes()
    assert sizes["total"] == len(down.to_bytes())
    assert sizes["masks"] + sizes["rescalers"] == 2 * res.extra_bytes_per_task
    back = Payload.from_bytes(down.to_bytes())
    for t in ("a", "c"):
        rebuilt = torch.where(back.masks[t], back.vectors["merged"] * back.rescalers.get(t, 1.0), 0)
        assert torch.equal(rebuilt, res.per_task(index[t]))
