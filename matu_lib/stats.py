"""Statistics for comparisons over seeds: chance-corrected normalisation, mean ± sd, paired bootstrap intervals.

Pure functions over numbers and plain dicts (no torch, no files), so every figure in a results table can be
recomputed by hand from the per-seed ``summary.json`` files.

Measures (per task t, then averaged over tasks):

- ``normalised``: chance-corrected, ``(acc - chance) / (individual - chance)`` with ``chance = 1 / classes``.
  0 means chance, 1 means individual fine-tuning. The plain ratio rewards a method for the chance level
  itself: a task nobody learned (individual at chance) turns noise into ratios such as 1.6.
- ``ratio``: the older ``acc / individual``, kept beside it for continuity with earlier tables.

A task is *unlearnable* (flagged) when its individual reference is within noise of chance:
``mean(individual) - chance < max(2 * sd, CHANCE_MARGIN)`` over seeds (``CHANCE_MARGIN`` alone for one seed).
The margin also applies with several seeds because an sd from 2-3 seeds can be small by luck, and a
denominator of a few points of accuracy makes the normalised score noise whatever the sd says. Flagged tasks
are left out of ``mean_normalised`` and ``mean_ratio``; ``*_all`` keeps every task.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

CHANCE_MARGIN = 0.05  # accuracy points above chance an individual reference needs to count as learned
BOOTSTRAP_SCHEMES = ("crossed", "pairs", "seeds")


def mean_sd(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1); sd is NaN for one value (no spread can be measured)."""
    x = np.asarray(list(values), dtype=float)
    if x.size == 0:
        return math.nan, math.nan
    return float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else math.nan


def over_seeds(n_seeds: int) -> str:
    """How a mean over ``n_seeds`` seeds is described. One seed has no spread, so no sd is named (``mean_sd``
    gives NaN) and the reader is told there is none rather than shown a "± sd" that cannot exist."""
    return f"mean ± sd over {n_seeds} seeds" if n_seeds > 1 else "mean over 1 seed (no spread)"


def flag_rule(n_seeds: int, reference: str, margin: float = CHANCE_MARGIN) -> str:
    """The rule ``unlearnable`` applies to ``n_seeds`` seeds, in words: 2 sd enters only where an sd exists."""
    if n_seeds > 1:
        return f"{reference} within max(2 sd, {margin}) of chance"
    return f"{reference} within {margin} of chance; one seed gives no sd"


def chance_corrected(acc: float, reference: float, chance: float) -> float:
    """``(acc - chance) / (reference - chance)``; NaN when the reference is not above chance (undefined)."""
    gap = reference - chance
    return (acc - chance) / gap if gap > 0 else math.nan


def unlearnable(references: Sequence[float], chance: float, margin: float = CHANCE_MARGIN) -> bool:
    """True when the individual reference (one value per seed) is within noise of chance (see module doc)."""
    mean, sd = mean_sd(references)
    noise = margin if math.isnan(sd) else max(2 * sd, margin)
    return mean - chance < noise


def normalise(
    acc: Mapping[str, float], reference: Mapping[str, float], chance: Mapping[str, float], flagged: Iterable[str] = ()
) -> dict:
    """Per-task ``normalised`` and ``ratio``, their means without the ``flagged`` tasks and with all (``*_all``)."""
    flagged = set(flagged)
    norm = {t: chance_corrected(a, reference[t], chance[t]) for t, a in acc.items()}
    ratio = {t: a / reference[t] if reference[t] else math.nan for t, a in acc.items()}
    kept = [t for t in acc if t not in flagged]

    def mean(d: dict, tasks: list[str]) -> float:
        vals = [d[t] for t in tasks if not math.isnan(d[t])]
        return float(np.mean(vals)) if vals else math.nan

    return {
        "normalised": norm,
        "ratio": ratio,
        "flagged": sorted(flagged & set(acc)),
        "mean_normalised": mean(norm, kept),
        "mean_normalised_all": mean(norm, list(acc)),
        "mean_ratio": mean(ratio, kept),
        "mean_ratio_all": mean(ratio, list(acc)),
    }


def bootstrap_mean_ci(
    diffs: np.ndarray, n_boot: int = 10_000, seed: int = 0, level: float = 0.95, scheme: str = "crossed"
) -> tuple[float, float]:
    """Percentile bootstrap interval for the mean of a [seeds, tasks] matrix of paired differences.

    ``crossed`` (default) resamples seeds and tasks independently, both with replacement, and averages the
    resampled grid: the interval then reflects both seed-to-seed and task-to-task variation, and a seed that
    favours one method on every task counts once, not once per task. ``pairs`` resamples the (seed, task)
    cells as if independent (narrower when seeds differ as a whole); ``seeds`` resamples whole seeds only
    (with 3 seeds that is only 10 distinct resamples, too coarse for a percentile interval).
    """
    d = np.asarray(diffs, dtype=float)
    if d.ndim != 2 or d.size == 0 or np.isnan(d).any():
        raise ValueError(
            f"paired differences must be a non-empty [seeds, tasks] matrix without NaN, got shape {d.shape}"
        )
    if scheme not in BOOTSTRAP_SCHEMES:
        raise ValueError(f"unknown bootstrap scheme {scheme!r}; choose from {BOOTSTRAP_SCHEMES}")
    rng = np.random.default_rng(seed)
    n_s, n_t = d.shape
    if scheme == "pairs":
        flat = d.ravel()
        stats = flat[rng.integers(0, flat.size, size=(n_boot, flat.size))].mean(axis=1)
    else:
        s = rng.integers(0, n_s, size=(n_boot, n_s))
        t = (
            rng.integers(0, n_t, size=(n_boot, n_t))
            if scheme == "crossed"
            else np.broadcast_to(np.arange(n_t), (n_boot, n_t))
        )
        stats = d[s[:, :, None], t[:, None, :]].mean(axis=(1, 2))
    alpha = (1 - level) / 2
    lo, hi = np.quantile(stats, [alpha, 1 - alpha])
    return float(lo), float(hi)


def paired_difference(
    a: np.ndarray, b: np.ndarray, n_boot: int = 10_000, seed: int = 0, level: float = 0.95, scheme: str = "crossed"
) -> dict:
    """``a - b`` for two [seeds, tasks] score matrices paired on seed and task: mean, per-seed means, interval."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    lo, hi = bootstrap_mean_ci(d, n_boot, seed, level, scheme)
    return {
        "mean": float(d.mean()),
        "per_seed": [float(x) for x in d.mean(axis=1)],
        "ci": [lo, hi],
        "level": level,
        "scheme": scheme,
        "n_boot": n_boot,
    }


# --------------------------------------------------------------------------- a comparison over seeds


def aggregate_seeds(
    rows_by_seed: Mapping[int, Sequence[Mapping]],
    chance: Mapping[str, float],
    target: str = "matu",
    reference: str = "individual",
    margin: float = CHANCE_MARGIN,
    n_boot: int = 10_000,
    boot_seed: int = 0,
    scheme: str = "crossed",
    converged: str = "individual_converged",
) -> dict:
    """Aggregate ``comparison.compare`` rows (one list per seed) into mean ± sd and paired differences.

    Tasks are flagged once from the reference's accuracy over all seeds, so every seed and method is averaged
    over the same tasks. Differences are ``target - method`` on absolute accuracy (all tasks) and on the
    normalised score (learnable tasks), paired on (seed, task). When the ``converged`` reference (per-task
    fine-tuning trained until validation stops improving) is among the methods, every row also gets
    ``mean_normalised_converged``: the same normalisation against it, over the same learnable tasks.
    """
    seeds = sorted(rows_by_seed)
    if not seeds:
        raise ValueError("no seeds to aggregate")
    by_seed = {s: {r["method"]: r for r in rows_by_seed[s]} for s in seeds}
    methods = list(dict.fromkeys(m for s in seeds for m in by_seed[s]))
    missing = [(s, m) for s in seeds for m in methods if m not in by_seed[s]]
    if missing:
        raise ValueError(f"every seed needs every method; missing (seed, method): {missing}")
    if reference not in methods:
        raise ValueError(f"the reference method {reference!r} is not among {methods}")
    tasks = list(by_seed[seeds[0]][reference]["acc"])
    no_chance = [t for t in tasks if t not in chance]
    if no_chance:
        raise ValueError(f"no chance level for tasks {no_chance}")
    ref = {s: by_seed[s][reference]["acc"] for s in seeds}
    flagged = sorted(t for t in tasks if unlearnable([ref[s][t] for s in seeds], chance[t], margin))
    learnable = [t for t in tasks if t not in flagged]

    scores: dict[str, dict[str, np.ndarray]] = {}  # method -> measure -> [seeds, tasks]
    out_methods = {}
    for m in methods:
        per_seed = [normalise(by_seed[s][m]["acc"], ref[s], chance, flagged) for s in seeds]
        acc = np.array([[by_seed[s][m]["acc"][t] for t in tasks] for s in seeds])
        norm = np.array([[p["normalised"][t] for t in tasks] for p in per_seed])
        scores[m] = {"acc": acc, "normalised": norm}
        row: dict = {"seeds": seeds}
        for key in ("mean_normalised", "mean_normalised_all", "mean_ratio", "mean_ratio_all"):
            row[key] = mean_sd(p[key] for p in per_seed)
        row["mean_acc"] = mean_sd(acc.mean(axis=1))
        for key in ("bytes_up_per_round", "bytes_down_per_round", "server_state_bytes"):
            if all(key in by_seed[s][m] for s in seeds):
                row[key] = float(np.mean([by_seed[s][m][key] for s in seeds]))
        if converged in methods:
            row["mean_normalised_converged"] = mean_sd(
                normalise(by_seed[s][m]["acc"], by_seed[s][converged]["acc"], chance, flagged)["mean_normalised"]
                for s in seeds
            )
        row["acc"] = {t: mean_sd(acc[:, j]) for j, t in enumerate(tasks)}
        row["normalised"] = {t: mean_sd(norm[:, j]) for j, t in enumerate(tasks)}
        out_methods[m] = row

    differences = {}
    if target in methods and learnable:
        cols = [tasks.index(t) for t in learnable]
        for m in methods:
            if m == target:
                continue
            differences[m] = {
                "acc": paired_difference(scores[target]["acc"], scores[m]["acc"], n_boot, boot_seed, scheme=scheme),
                "normalised": paired_difference(
                    scores[target]["normalised"][:, cols],
                    scores[m]["normalised"][:, cols],
                    n_boot,
                    boot_seed,
                    scheme=scheme,
                ),
            }
    return {
        "seeds": seeds,
        "tasks": tasks,
        "chance": {t: chance[t] for t in tasks},
        "flagged": flagged,
        "margin": margin,
        "target": target,
        "reference": reference,
        "converged_reference": converged if converged in methods else None,
        "methods": out_methods,
        "differences": differences,
    }


def losses_in_words(summary: Mapping, exclude: Iterable[str] = ("individual", "individual_converged")) -> list[str]:
    """One sentence per method whose mean beats the target on absolute accuracy or on the normalised score.

    The reference (individual fine-tuning on pooled data) is excluded by default: it is the upper bound the
    normalised score divides by, not a federated baseline. Pass ``exclude=()`` to include it.
    """
    target, n = summary["target"], len(summary["seeds"])
    names = {"acc": "absolute accuracy", "normalised": "normalised accuracy"}
    out = []
    for m, diff in summary["differences"].items():
        if m in set(exclude):
            continue
        lost = [(names[k], d) for k, d in diff.items() if d["mean"] < 0]
        if not lost:
            continue
        parts = [
            f"on {name} by {-d['mean']:.3f} (paired {round(100 * d['level'])}% CI of {target} - {m}: "
            f"{d['ci'][0]:+.3f} to {d['ci'][1]:+.3f})"
            for name, d in lost
        ]
        seeds = f"{n} seed{'s' if n != 1 else ''}"
        out.append(f"{display_name(target)} loses to {m} " + " and ".join(parts) + f", mean over {seeds}.")
    return out


def display_name(method: str) -> str:
    """How sentences name a method: the paper's spelling for MaTU, the registry name for the others."""
    return "MaTU" if method == "matu" else method
