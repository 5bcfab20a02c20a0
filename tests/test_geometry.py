"""geometry.py against naive references on small vectors."""

import itertools
import math

import numpy as np
import pytest
import torch

from matu_lib import geometry
from matu_lib.modulators import unify


@pytest.fixture()
def vectors():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(60, generator=g)
    return {
        "a": base + 0.3 * torch.randn(60, generator=g),
        "b": base + 0.3 * torch.randn(60, generator=g),
        "c": torch.randn(60, generator=g),
        "d": -base + 0.1 * torch.randn(60, generator=g),
    }


LAYOUT = [
    ("conv1.weight", (2, 5)),
    ("transformer.resblocks.0.attn.in_proj_weight", (4, 5)),
    ("transformer.resblocks.0.mlp.c_fc.weight", (20,)),
    ("transformer.resblocks.0.ln_1.weight", (5,)),
    ("proj", (5,)),
]


def test_pairwise_cosine_and_sign_match_naive(vectors):
    vs = [v.double().numpy() for v in vectors.values()]
    naive_cos = np.array([[a @ b / np.linalg.norm(a) / np.linalg.norm(b) for b in vs] for a in vs])
    naive_sign = np.array([[np.mean(np.sign(a) * np.sign(b)) for b in vs] for a in vs])
    np.fill_diagonal(naive_sign, 1.0)
    assert np.allclose(geometry.pairwise_similarity(vectors, "cosine"), naive_cos, atol=1e-6)
    assert np.allclose(geometry.pairwise_similarity(vectors, "sign"), naive_sign, atol=1e-6)


def test_family_means_and_order():
    tasks = ["x1", "y1", "x2", "y2"]
    fam = {"x1": "x", "x2": "x", "y1": "y", "y2": "y"}
    m = np.array([[1, 0.1, 0.9, 0.2], [0.1, 1, 0.3, 0.7], [0.9, 0.3, 1, 0.4], [0.2, 0.7, 0.4, 1]])
    out = geometry.family_means(m, tasks, fam)
    assert out["within"] == pytest.approx((0.9 + 0.7) / 2)
    assert out["across"] == pytest.approx(np.mean([0.1, 0.2, 0.3, 0.4]))
    order = geometry.family_order(tasks, fam)
    assert order == ["x1", "x2", "y1", "y2"]
    r = geometry.reorder(m, tasks, order)
    assert r[0, 1] == 0.9 and r[2, 3] == 0.7


def test_parameter_groups_cover_vector_in_order():
    groups = geometry.group_slices(LAYOUT)
    assert list(groups) == ["stem", "block0.attn", "block0.mlp", "block0.norm", "output"]
    covered = sorted(i for sl in groups.values() for s in sl for i in range(s.start, s.stop))
    assert covered == list(range(10 + 20 + 20 + 5 + 5))


def test_sign_conflicts_match_naive(vectors):
    vectors = {t: v for t, v in vectors.items()}  # 60 entries = LAYOUT size
    out = geometry.sign_conflicts(vectors, LAYOUT)
    vs = list(vectors.values())
    for group, slices in geometry.group_slices(LAYOUT).items():
        idx = [i for s in slices for i in range(s.start, s.stop)]
        naive = np.mean([np.mean([float(a[i] * b[i] < 0) for i in idx]) for a, b in itertools.combinations(vs, 2)])
        assert out[group] == pytest.approx(naive)
    same = {"a": vs[0], "b": 2 * vs[0]}
    assert all(v == 0 for v in geometry.sign_conflicts(same, LAYOUT).values())


def test_embed_2d_separates_opposite_directions(vectors):
    xy = geometry.embed_2d(vectors, "pca")
    assert xy.shape == (4, 2)
    d = lambda i, j: np.linalg.norm(xy[i] - xy[j])  # noqa: E731
    assert d(0, 1) < d(0, 3)  # a and b share a direction, d is opposite
    with pytest.raises(ValueError):
        geometry.embed_2d(vectors, "umap")


def test_cluster_and_ari_recover_blocks():
    s = np.full((6, 6), -0.2)
    for block in ([0, 1, 2], [3, 4, 5]):
        s[np.ix_(block, block)] = 0.8
    np.fill_diagonal(s, 1.0)
    tasks = list("abcdef")
    fam = {t: ("f" if i < 3 else "g") for i, t in enumerate(tasks)}
    assert geometry.family_ari(s, tasks, fam)["ari"] == pytest.approx(1.0)
    shuffled = {t: ("f" if i % 2 else "g") for i, t in enumerate(tasks)}
    assert geometry.family_ari(s, tasks, shuffled)["ari"] < 0.2


def test_masks_density_and_jaccard():
    a = torch.tensor([1, 1, 0, 0, 1], dtype=torch.bool)
    b = torch.tensor([1, 0, 0, 1, 1], dtype=torch.bool)
    assert geometry.mask_density({"a": a})["a"] == pytest.approx(0.6)
    assert geometry.jaccard(a, b) == pytest.approx(2 / 4)
    assert geometry.jaccard(torch.zeros(3, dtype=torch.bool), torch.zeros(3, dtype=torch.bool)) == 1.0
    j = geometry.jaccard_matrix({"a": a, "b": b})
    assert np.allclose(j, j.T) and np.allclose(np.diag(j), 1.0)


def test_modulator_variants_and_stats_follow_emr(vectors):
    variants = geometry.modulator_variants(vectors)
    stats = geometry.unification_stats(vectors)
    stack = torch.stack(list(vectors.values()))
    sign = torch.where(stack.sum(0) > 0, 1.0, -1.0)
    mu = torch.where(stack * sign > 0, stack.abs(), 0).max(0).values
    assert torch.allclose(stats["unified"], sign * mu)
    for t, v in vectors.items():
        m = v * sign > 0
        lam = float(v.abs().sum() / (m * mu).abs().sum())
        assert torch.allclose(variants["reconstructed"][t], lam * m * sign * mu, atol=1e-6)
        assert torch.allclose(variants["masked"][t], m * sign * mu)
        assert torch.equal(variants["unified"][t], sign * mu)
        assert stats["l1_reconstructed"][t] == pytest.approx(stats["l1_original"][t], rel=1e-5)
        assert stats["rescalers"][t] == pytest.approx(lam, rel=1e-5)
    assert 0 < stats["agreement_mean"] <= 1


def test_client_reconstruction_of_a_single_task_is_exact(vectors):
    per_client = geometry.client_reconstructions(vectors, {0: ["a"], 1: ["b", "c"]})
    assert set(per_client) == {"a", "b", "c"}
    assert torch.allclose(per_client["a"], vectors["a"], atol=1e-6)
    cos = geometry.cosine_to(vectors, {"a": 3 * vectors["a"]})
    assert cos["a"] == pytest.approx(1.0)
    unified, masks, scales = unify([vectors["b"], vectors["c"]])
    assert torch.allclose(per_client["c"], torch.where(masks[1], unified * scales[1], 0))


class FakeTrainer:
    """Accuracy = clamp(0.5 + mean(delta) * sign_of_task, 0, 1): lets arithmetic helpers be checked by hand."""

    def __init__(self, signs):
        self.signs = signs

    def evaluate(self, delta, task, data, batch_size=512):
        if delta is None:
            return 0.5
        return float(min(1.0, max(0.0, 0.5 + float(delta.mean()) * self.signs[task])))


def test_arithmetic_helpers_with_fake_trainer():
    vectors = {"p": torch.full((4,), 0.4), "q": torch.full((4,), -0.2)}
    trainer = FakeTrainer({"p": 1.0, "q": -1.0})
    data = {"p": None, "q": None}
    curves = geometry.alpha_sweep(trainer, vectors["p"], ["p", "q"], data, [0.0, 1.0])
    assert curves == {"p": [0.5, pytest.approx(0.9)], "q": [0.5, pytest.approx(0.1)]}
    neg = geometry.negation_effect(trainer, vectors, "p", "q", data, [0.0, 1.0])
    assert neg["target_acc"][-1] == pytest.approx(0.1) and neg["target_drop"] == pytest.approx(0.4)
    merge = geometry.interference(trainer, vectors, data, data, [0.5, 1.0])
    # sum = 0.2: p gains 0.2*alpha, q loses 0.2*alpha -> mean 0.5 for both alphas: first best kept
    assert merge["alpha"] == 0.5
    assert merge["individual"] == {"p": pytest.approx(0.9), "q": pytest.approx(0.7)}


def test_retention_by_size_is_exact_alone_and_lossy_when_tasks_share_a_vector(toy_task):
    from types import SimpleNamespace

    from matu_lib.training import FinetuneConfig

    (x, y), _ = toy_task
    spec = SimpleNamespace(classes=("dark", "bright"), templates=("a {} image",))
    train = {"a": (x, y), "b": (x.flip(-1), 1 - y)}
    specs = {"a": spec, "b": spec}
    ft = FinetuneConfig(steps=3, batch_size=16, lr=1e-3, weight_decay=0.0, warmup_steps=0, grad_clip=1.0)
    alone = geometry.retention_by_size(
        [("matu-micro", None)],
        train,
        {0: ["a"], 1: ["b"]},
        specs,
        ft,
        steps=3,
        evaluate=train,
        evaluate_random_init=True,
    )
    shared = geometry.retention_by_size(
        [("matu-micro", None)], train, {0: ["a", "b"]}, specs, ft, steps=3, evaluate=train
    )  # random init: not evaluated unless asked
    assert alone[0]["params"] == shared[0]["params"] > 0
    assert alone[0]["retention"] == pytest.approx(1.0, abs=1e-6)  # one task per client: nothing is lost
    assert shared[0]["retention"] < 0.999  # two tasks in one vector: interference
    # accuracy is measured only when asked; an exact reconstruction keeps the original's accuracy
    assert "acc_original" not in shared[0]
    assert alone[0]["acc_reconstructed"] == pytest.approx(alone[0]["acc_original"], abs=1e-9)
    orig = alone[0]["acc_original"]
    assert orig <= 0.5 and math.isnan(alone[0]["acc_retention"]) or alone[0]["acc_retention"] == pytest.approx(1.0)
