"""The geometry of task vectors: similarity, sign conflicts, low-dimensional maps, task arithmetic, clustering.

These are the analysis functions behind workbook notebooks 01-03. They are plain functions over flat task
vectors (1-D tensors, as returned by ``notebook.shared_task_vectors``) and return numpy arrays or plain
dicts, so notebooks only call and show them and tests can compare them with naive references.

Why these quantities: MaTU's server decides which tasks share knowledge from the *direction* of their task
vectors (the paper's abstract), and its modulators only work if a task's vector agrees in sign with the
unified vector on most of its mass. Cosine, sign agreement and sign conflicts per layer measure exactly that;
task arithmetic and interference show what happens when vectors are simply added instead.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from .aggregation import similarity_matrix
from .modulators import reconstruct, unify

Vectors = Mapping[str, Tensor]
Layout = Sequence[tuple[str, tuple[int, ...]]]


# ------------------------------------------------------------------------------------ similarity


def pairwise_similarity(vectors: Vectors, metric: str = "cosine") -> np.ndarray:
    """[T, T] similarity in the order of ``vectors``: ``cosine`` or ``sign`` (mean of sign products).

    The same function the MaTU server uses (``aggregation.similarity_matrix``), so what the notebooks show
    is what the server sees.
    """
    return similarity_matrix(list(vectors.values()), metric).double().numpy()


def norms(vectors: Vectors, p: float = 2) -> dict[str, float]:
    """L_p norm per task: how far fine-tuning moved the encoder (large norms dominate plain sums)."""
    return {t: float(torch.linalg.vector_norm(v.double(), ord=p)) for t, v in vectors.items()}


def family_order(tasks: Sequence[str], families: Mapping[str, str]) -> list[str]:
    """Tasks grouped by family (families in order of first appearance), so heatmaps show blocks."""
    first = {}
    for t in tasks:
        first.setdefault(families[t], len(first))
    return sorted(tasks, key=lambda t: (first[families[t]], list(tasks).index(t)))


def reorder(matrix: np.ndarray, tasks: Sequence[str], order: Sequence[str]) -> np.ndarray:
    """Rows and columns of ``matrix`` (indexed like ``tasks``) permuted into ``order``."""
    idx = [list(tasks).index(t) for t in order]
    return np.asarray(matrix)[np.ix_(idx, idx)]


def family_means(matrix: np.ndarray, tasks: Sequence[str], families: Mapping[str, str]) -> dict[str, float]:
    """Mean off-diagonal entry within families and across families, and their gap (within - across).

    A positive gap means the measure sees the family structure. ``within`` is NaN when no family has
    two tasks.
    """
    m = np.asarray(matrix, dtype=float)
    fam = np.array([families[t] for t in tasks])
    same = fam[:, None] == fam[None, :]
    off = ~np.eye(len(tasks), dtype=bool)
    within = float(m[same & off].mean()) if (same & off).any() else float("nan")
    across = float(m[~same].mean()) if (~same).any() else float("nan")
    return {"within": within, "across": across, "gap": within - across}


# ------------------------------------------------------------------------------- per-layer views


def parameter_group(name: str) -> str:
    """A readable group for an encoder parameter: ``stem``, ``block{i}.attn|mlp|norm``, or ``output``.

    Works for open_clip ViTs (the project's tiny models and ViT-B-32 share parameter names).
    """
    block = re.match(r"transformer\.resblocks\.(\d+)\.(attn|mlp|ln_\d)", name)
    if block:
        part = "norm" if block.group(2).startswith("ln") else block.group(2)
        return f"block{block.group(1)}.{part}"
    if name in ("ln_post.weight", "ln_post.bias", "proj"):
        return "output"
    return "stem"


def group_slices(layout: Layout) -> dict[str, list[slice]]:
    """Group name -> slices of the flat vector, in flatten order (groups in order of first appearance)."""
    out: dict[str, list[slice]] = {}
    offset = 0
    for name, shape in layout:
        n = int(np.prod(shape)) if shape else 1
        out.setdefault(parameter_group(name), []).append(slice(offset, offset + n))
        offset += n
    return out


def select_group(vector: Tensor, slices: Sequence[slice]) -> Tensor:
    """The entries of a flat vector that belong to one parameter group."""
    return torch.cat([vector[s] for s in slices])


def sign_conflicts(vectors: Vectors, layout: Layout) -> dict[str, float]:
    """Per parameter group: mean over task pairs of the fraction of entries pushed in opposite directions.

    0 means every pair of tasks moves each weight the same way, ~0.5 means signs are unrelated (random
    directions). This is the conflict that sign election (MaTU's unified vector) has to resolve.
    """
    vs = list(vectors.values())
    out = {}
    for group, slices in group_slices(layout).items():
        signs = torch.stack([torch.sign(select_group(v, slices)) for v in vs])
        pairs = [
            float(((signs[a] * signs[b]) < 0).double().mean()) for a in range(len(vs)) for b in range(a + 1, len(vs))
        ]
        out[group] = float(np.mean(pairs)) if pairs else 0.0
    return out


def group_similarity(vectors: Vectors, layout: Layout, group: str | None, metric: str = "cosine") -> np.ndarray:
    """``pairwise_similarity`` restricted to one parameter group (``None``: the whole vector)."""
    if group is None:
        return pairwise_similarity(vectors, metric)
    slices = group_slices(layout)[group]
    return pairwise_similarity({t: select_group(v, slices) for t, v in vectors.items()}, metric)


# ------------------------------------------------------------------------------------ 2-D maps


def embed_2d(vectors: Vectors, method: str = "pca", seed: int = 0) -> np.ndarray:
    """[T, 2] coordinates of the (L2-normalised) task vectors: PCA, or t-SNE on cosine distances.

    Normalising first makes the map about direction, not size (norms are shown separately). t-SNE needs
    a handful of points to mean anything; with few tasks use PCA.
    """
    x = torch.stack([v.double() / v.double().norm().clamp_min(1e-30) for v in vectors.values()]).numpy()
    if method == "pca":
        from sklearn.decomposition import PCA

        return PCA(n_components=2, random_state=seed).fit_transform(x)
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = float(max(1.0, min(5.0, (len(x) - 1) / 3)))
        return TSNE(
            n_components=2, perplexity=perplexity, metric="cosine", init="random", random_state=seed
        ).fit_transform(x)
    raise ValueError(f"unknown embedding method {method!r} (use 'pca' or 'tsne')")


# ------------------------------------------------------------------------------- task arithmetic


def evaluate_tasks(
    trainer, delta: Tensor | None, tasks: Sequence[str], data: Mapping, batch_size: int = 512
) -> dict[str, float]:
    """Accuracy of theta_0 + delta on each task (with that task's head)."""
    return {t: float(trainer.evaluate(delta, t, data[t], batch_size)) for t in tasks}


def alpha_sweep(
    trainer, direction: Tensor, tasks: Sequence[str], data: Mapping, alphas: Sequence[float], batch_size: int = 512
) -> dict[str, list[float]]:
    """Accuracy per task of theta_0 + alpha * direction for each alpha (task -> list over alphas).

    ``direction`` is a sum of task vectors (addition) or a negated one (forgetting).
    """
    curves: dict[str, list[float]] = {t: [] for t in tasks}
    for a in alphas:
        for t, acc in evaluate_tasks(trainer, float(a) * direction, tasks, data, batch_size).items():
            curves[t].append(acc)
    return curves


def negation_effect(
    trainer, vectors: Vectors, target: str, control: str, data: Mapping, alphas: Sequence[float] = (0.0, 0.5, 1.0)
) -> dict:
    """Forgetting by subtraction: accuracy of theta_0 - alpha * tau_target on the target and a control task.

    Task arithmetic predicts the target falls to or below zero-shot; the control task measures what else the
    subtraction touches (the encoder's features are shared, so it can move too).
    """
    curves = alpha_sweep(trainer, -vectors[target], [target, control], data, alphas)
    return {
        "alphas": list(map(float, alphas)),
        "target": target,
        "control": control,
        "target_acc": curves[target],
        "control_acc": curves[control],
        "target_drop": curves[target][0] - curves[target][-1],
        "control_change": curves[control][-1] - curves[control][0],
    }


def interference(
    trainer, vectors: Vectors, val: Mapping, test: Mapping, alphas: Sequence[float], batch_size: int = 512
) -> dict:
    """Task arithmetic over all tasks: theta_0 + alpha * sum_t tau_t, alpha chosen on validation.

    Returns the validation mean per alpha, the chosen alpha, TEST accuracy per task of the merged model
    and of each task's own vector. The gap between the two is the interference MaTU's modulators remove.
    """
    tasks = list(vectors)
    total = torch.stack(list(vectors.values())).sum(0)
    val_curves = alpha_sweep(trainer, total, tasks, val, alphas, batch_size)
    val_mean = [float(np.mean([val_curves[t][i] for t in tasks])) for i in range(len(alphas))]
    best = float(alphas[int(np.argmax(val_mean))])
    merged = evaluate_tasks(trainer, best * total, tasks, test, batch_size)
    individual = {t: float(trainer.evaluate(vectors[t], t, test[t], batch_size)) for t in tasks}
    return {
        "alphas": list(map(float, alphas)),
        "val_mean": val_mean,
        "alpha": best,
        "merged": merged,
        "individual": individual,
        "merged_mean": float(np.mean(list(merged.values()))),
        "individual_mean": float(np.mean(list(individual.values()))),
    }


# ------------------------------------------------------------------------------------ clustering


def cluster(similarity: np.ndarray, n_clusters: int) -> np.ndarray:
    """Average-linkage hierarchical clustering on distance 1 - S; returns a label per task."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    d = np.clip(1.0 - np.asarray(similarity, dtype=float), 0.0, None)
    d = (d + d.T) / 2
    np.fill_diagonal(d, 0.0)
    if len(d) < 2:
        return np.zeros(len(d), dtype=int)
    return fcluster(linkage(squareform(d, checks=False), method="average"), t=n_clusters, criterion="maxclust") - 1


def family_ari(similarity: np.ndarray, tasks: Sequence[str], families: Mapping[str, str]) -> dict:
    """Cluster S into as many groups as there are families; adjusted Rand index against the families.

    ARI is 1 for a perfect recovery of the families and ~0 for chance (it can be negative).
    """
    from sklearn.metrics import adjusted_rand_score

    truth = [families[t] for t in tasks]
    labels = cluster(similarity, len(set(truth)))
    return {"ari": float(adjusted_rand_score(truth, labels)), "labels": [int(x) for x in labels]}


def server_similarity_rounds(
    history: Sequence[Mapping], order: Sequence[str], families: Mapping[str, str], measure: str = "similarity_vector"
) -> dict:
    """The server's similarity per round of a MaTU run (from each round's ``info``), reordered to ``order``,
    with the family ARI and within-minus-across gap per round. ``measure``: ``similarity_vector`` (averaged task
    vectors), ``similarity_sketch`` (update sketches) or ``similarity`` (whichever drove transfer)."""
    mats = [reorder(np.array(h["info"][measure]), h["info"]["tasks"], order) for h in history if measure in h["info"]]
    return {
        "matrices": mats,
        "ari": [family_ari(m, order, families)["ari"] for m in mats],
        "gap": [family_means(m, order, families)["gap"] for m in mats],
    }


# ------------------------------------------------------------------------------------ modulators


def mask_density(masks: Mapping[str, Tensor]) -> dict[str, float]:
    """Fraction of parameters each task keeps from the unified vector (its mask's mean)."""
    return {t: float(m.double().mean()) for t, m in masks.items()}


def jaccard(a: Tensor, b: Tensor) -> float:
    """|a & b| / |a | b| of two bool masks (1.0 for two empty masks)."""
    union = int((a | b).sum())
    return float(int((a & b).sum()) / union) if union else 1.0


def jaccard_matrix(masks: Mapping[str, Tensor]) -> np.ndarray:
    """[T, T] mask overlap: related tasks should keep overlapping parts of the unified vector."""
    ms = list(masks.values())
    return np.array([[jaccard(a, b) for b in ms] for a in ms])


def modulator_variants(
    vectors: Vectors, rule: str = "sum", tie: str = "negative", magnitude: str = "max"
) -> dict[str, dict[str, Tensor]]:
    """Each task's vector under MaTU's design choices, unifying all of ``vectors`` at once (EMR, one-shot).

    ``original`` tau_t; ``reconstructed`` lambda_t * m_t * tau_u; ``masked`` m_t * tau_u (no rescaler);
    ``unified`` tau_u itself (no mask, no rescaler: every task gets the same vector).
    """
    tasks, vs = list(vectors), list(vectors.values())
    unified, masks, scales = unify(vs, rule=rule, tie=tie, magnitude=magnitude)
    return {
        "original": dict(vectors),
        "reconstructed": {t: reconstruct(unified, m, s) for t, m, s in zip(tasks, masks, scales)},
        "masked": {t: reconstruct(unified, m, 1.0) for t, m in zip(tasks, masks)},
        "unified": {t: unified for t in tasks},
    }


def unification_stats(vectors: Vectors, rule: str = "sum", tie: str = "negative", magnitude: str = "max") -> dict:
    """Elect/mask/rescale step by step: the elected signs, masks, rescalers and L1 norms per task.

    ``l1_masked`` is what a mask alone keeps (|m_t * tau_u|_1); the rescaler lifts it back to ``l1_original``.
    """
    tasks, vs = list(vectors), list(vectors.values())
    unified, masks, scales = unify(vs, rule=rule, tie=tie, magnitude=magnitude)
    stack = torch.stack(vs)
    sign = torch.sign(unified)
    agree = (torch.sign(stack) * sign > 0).double().mean(0)  # fraction of tasks agreeing per parameter
    return {
        "unified": unified,
        "masks": dict(zip(tasks, masks)),
        "rescalers": dict(zip(tasks, scales)),
        "positive_fraction": float((sign > 0).double().mean()),
        "agreement_mean": float(agree.mean()),
        "unanimous_fraction": float((agree == 1).double().mean()),
        "l1_original": {t: float(v.abs().sum()) for t, v in vectors.items()},
        "l1_masked": {t: float(reconstruct(unified, m, 1.0).abs().sum()) for t, m in zip(tasks, masks)},
        "l1_reconstructed": {t: float(reconstruct(unified, m, s).abs().sum()) for t, m, s in zip(tasks, masks, scales)},
    }


def cosine_to(reference: Vectors, other: Vectors) -> dict[str, float]:
    """Cosine of each task's vector in ``other`` with its ``reference`` vector (1 = same direction); tasks of both."""
    return {
        t: float(torch.nn.functional.cosine_similarity(reference[t].double(), other[t].double(), dim=0))
        for t in reference
        if t in other
    }


def client_reconstructions(
    vectors: Vectors,
    client_tasks: Mapping[int, Sequence[str]],
    rule: str = "sum",
    tie: str = "negative",
    magnitude: str = "max",
) -> dict[str, Tensor]:
    """Per-task reconstructions when each client unifies only its own tasks (MaTU's federated use).

    A task held by several clients is reconstructed by the first of them (with individual vectors all of
    them differ only in the co-held tasks; this keeps one number per task).
    """
    out: dict[str, Tensor] = {}
    for k in sorted(client_tasks):
        held = list(client_tasks[k])
        unified, masks, scales = unify([vectors[t] for t in held], rule=rule, tie=tie, magnitude=magnitude)
        for t, m, s in zip(held, masks, scales):
            out.setdefault(t, reconstruct(unified, m, s))
    return {t: out[t] for t in vectors if t in out}


# --------------------------------------------------------------------------- capacity: encoder size


def retention_by_size(
    models: Sequence[tuple[str, str | None]],
    train: Mapping,
    client_tasks: Mapping[int, Sequence[str]],
    specs: Mapping,
    finetune_cfg,
    steps: int,
    seed: int = 0,
    magnitude: str = "mean",
    evaluate: Mapping | None = None,
    evaluate_random_init: bool = False,
) -> list[dict]:
    """How much of each task vector survives one per-client unification, for encoders of several sizes.

    For each ``(model name, pretrained tag)`` every task is fine-tuned alone for ``steps`` steps on ``train[task]``,
    each client unifies its own tasks (``client_tasks``), and the cosine between a task's reconstruction and its
    original vector is averaged over tasks. Unrelated tasks interfere less when the encoder has more room, so
    the retention should grow with the parameter count (EMR keeps about 98% at 88 M parameters).

    Cosine is not accuracy: what a larger encoder buys may be that the same loss of direction costs less. With
    ``evaluate`` (task -> split) each row also holds the mean accuracy of the originals and of the
    reconstructions, and ``acc_retention`` = (reconstructed - chance) / (original - chance) on those means
    (chance = 1 / classes): the share of what fine-tuning gained above chance that one unification keeps.
    Only pretrained encoders are evaluated unless ``evaluate_random_init``: a few steps from random
    initialisation leave a model so close to chance that the ratio measures noise, and evaluating costs time.
    """
    from .backbones import load_backbone
    from .training import LocalTrainer, derive_seed

    rows = []
    for name, pretrained in models:
        backbone = load_backbone(name, pretrained)
        heads = {t: backbone.head(specs[t].classes, specs[t].templates) for t in train}
        trainer = LocalTrainer(backbone, heads, finetune_cfg)
        vectors = {t: trainer.train_task(None, t, train[t], steps, derive_seed(seed, "size", name, t)) for t in train}
        rec = client_reconstructions(vectors, client_tasks, magnitude=magnitude)
        cos = cosine_to(vectors, rec)
        row = {
            "model": name,
            "pretrained": pretrained or "random init",
            "params": trainer.n_params,
            "retention": float(np.mean(list(cos.values()))),
            "per_task": cos,
        }
        if evaluate is not None and (pretrained is not None or evaluate_random_init):
            tasks = sorted(rec)
            orig = float(np.mean([trainer.evaluate(vectors[t], t, evaluate[t]) for t in tasks]))
            recon = float(np.mean([trainer.evaluate(rec[t], t, evaluate[t]) for t in tasks]))
            chance = float(np.mean([1 / len(specs[t].classes) for t in tasks]))
            row |= {
                "acc_original": orig,
                "acc_reconstructed": recon,
                "acc_retention": (recon - chance) / (orig - chance) if orig > chance else float("nan"),
            }
        rows.append(row)
    return rows
