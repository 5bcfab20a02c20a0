"""One-shot model-merging baselines on flat task vectors, all with one signature.

``merge_fn(vectors, **options) -> MergeResult``: ``vectors`` are the flattened task vectors
tau_t = theta_t - theta_0 (a sequence of 1-D tensors of one length), never stacked, so 30 tasks of
ViT-B/32 size (88M parameters) stay within memory; each method walks them in ``chunk_size`` slices.

Methods (``MERGERS``):
- ``task_arithmetic`` (Ilharco et al., ICLR 2023): coef * sum_t tau_t.
- ``ties`` (Yadav et al., NeurIPS 2023): trim, elect sign by mass, disjoint mean; times coef.
- ``tall_masks`` (Wang et al., ICML 2024): tau_MTL = sum_t tau_t (unscaled) and a per-task mask
  m_t = 1[|tau_t| > lam_t * |tau_MTL - tau_t|]; task t uses m_t * tau_MTL, with no coefficient.
- ``consensus`` (same paper): keep only weights active in >= k TALL masks, then coef * the kept sum;
  one model for all tasks.
- ``emr`` (Huang et al., NeurIPS 2024): unified vector + per-task masks and rescalers, tuning-free;
  these are MaTU's modulators (``matu_lib.modulators``).

Scaling coefficients and TALL's lambda are hyper-parameters the caller must pick on *validation*
data: ``COEF_GRID``, ``LAMBDA_GRID`` (declared here once), ``grid``, ``select_on_validation`` (one
choice for all tasks) and ``select_per_task`` (TALL's lambda_t, one choice per task) do that, and
the methods take ``coef`` / ``lam`` as required keywords so that no silent default sneaks into a
comparison.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from matu_lib.modulators import (
    DEFAULT_CHUNK_SIZE,
    ElectRule,
    TieRule,
    acc_dtype,
    check_vectors,
    mask_nbytes,
    pack_mask,
    raise_if_not_finite,
    reconstruct,
    spans,
    unify,
    unpack_mask,
)

COEF_GRID: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
LAMBDA_GRID: tuple[float, ...] = (0.2, 0.3, 0.4, 0.5, 0.6)  # TALL masks' lambda_t, as in Wang et al.

RESCALER_BYTES = 4  # one float32 per task


@dataclass
class MergeResult:
    """Outcome of a merge.

    ``merged`` already includes ``coef``: theta_0 + merged is the single merged model. ``per_task(i)``
    is the vector task i actually uses (theta_0 + per_task(i)); it equals ``merged`` for methods
    without per-task state. ``extra_bytes_per_task`` counts that per-task state (bit-packed mask and
    float32 rescaler) for communication accounting; 0 for single-model methods. ``masks`` (bit-packed,
    one per task) and ``rescalers`` are that state itself, so a download can serialise it (empty when absent).
    """

    merged: Tensor
    per_task: Callable[[int], Tensor]
    coef: float
    extra_bytes_per_task: int
    masks: list[Tensor] = field(default_factory=list)
    rescalers: list[float] = field(default_factory=list)


def _check_coef(coef: float, name: str = "coef") -> float:
    if isinstance(coef, bool) or not isinstance(coef, (int, float)) or not math.isfinite(coef):
        raise ValueError(f"{name} must be a finite number, got {coef!r}")
    return float(coef)


def _shared(merged: Tensor, n_tasks: int, coef: float) -> MergeResult:
    def per_task(i: int) -> Tensor:
        _check_task_index(i, n_tasks)
        return merged

    return MergeResult(merged, per_task, coef, 0)


def _check_task_index(i: int, n_tasks: int) -> None:
    if not 0 <= i < n_tasks:
        raise IndexError(f"task index {i} out of range for {n_tasks} tasks")


def _scaled_sum_chunk(chunks: Sequence[Tensor], coef: float, start: int) -> Tensor:
    """coef * sum of one slice (float32 accumulation; see ``matu_lib.modulators`` on why not float64)."""
    total = torch.zeros(chunks[0].numel(), dtype=acc_dtype(chunks[0].dtype), device=chunks[0].device)
    for c in chunks:
        total += c
    raise_if_not_finite(chunks, total, start)
    return (total * coef).to(chunks[0].dtype)


# ----------------------------------------------------------------------------- task arithmetic


def task_arithmetic(vectors: Sequence[Tensor], *, coef: float, chunk_size: int = DEFAULT_CHUNK_SIZE) -> MergeResult:
    """coef * sum_t tau_t: the simplest multi-task model, and tau_MTL for TALL masks."""
    n, dtype = check_vectors(vectors)
    coef = _check_coef(coef)
    merged = torch.empty(n, dtype=dtype, device=vectors[0].device)
    for a, b in spans(n, chunk_size):
        merged[a:b] = _scaled_sum_chunk([v[a:b] for v in vectors], coef, a)
    return _shared(merged, len(vectors), coef)


# ----------------------------------------------------------------------------- TIES


def _trim_threshold(vector: Tensor, k: float) -> float:
    """Magnitude threshold keeping vector's top-k fraction, exactly as the TIES reference code does:
    keep |x| >= the (d - int(d*k))-th smallest |x|, so ties at the threshold are all kept.

    The order statistic needs the whole vector, so this is the one step that holds a full |tau_t|
    copy -- of one task at a time.
    """
    d = vector.numel()
    keep = int(d * k)
    if keep >= d:
        return 0.0  # keep everything (zeros are harmless: they never count in the disjoint mean)
    return float(vector.abs().kthvalue(d - keep).values)


def ties(
    vectors: Sequence[Tensor],
    *,
    coef: float,
    k: float = 0.2,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> MergeResult:
    """TIES-Merging: trim each tau_t to its top-k fraction by magnitude, elect the sign of the sum of
    trimmed values, average the trimmed entries that agree with it (disjoint mean); times coef.

    Zero sums are resolved as in the TIES code (``resolve_zero_signs(..., "majority")``): they take
    the sign of the sum of all elected signs (0 if that too is 0, which drops the entry).
    """
    n, dtype = check_vectors(vectors)
    coef = _check_coef(coef)
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not 0 < k <= 1:
        raise ValueError(f"k is the kept fraction and must be in (0, 1], got {k!r}")
    device = vectors[0].device

    def trimmed(v: Tensor, t: float, a: int, b: int) -> Tensor:
        c = v[a:b]
        return torch.where(c.abs() >= t, c, 0)

    # Pass 1: elect signs (int8) and count them, checking for NaN/Inf on the way.
    thresholds = []
    for i, v in enumerate(vectors):
        t = _trim_threshold(v, k)
        if not math.isfinite(t):
            raise ValueError(f"task vector {i} contains NaN/Inf")
        thresholds.append(t)
    sign = torch.empty(n, dtype=torch.int8, device=device)
    sign_total = 0
    for a, b in spans(n, chunk_size):
        chunks = [trimmed(v, t, a, b) for v, t in zip(vectors, thresholds)]
        total = torch.zeros(b - a, dtype=acc_dtype(dtype), device=device)
        for c in chunks:
            total += c
        raise_if_not_finite([v[a:b] for v in vectors], total, a)
        sign[a:b] = torch.sign(total)
        sign_total += int(sign[a:b].sum(dtype=torch.int64))
    sign[sign == 0] = int(math.copysign(1, sign_total)) if sign_total else 0

    # Pass 2: disjoint mean over agreeing (hence nonzero) trimmed entries.
    merged = torch.empty(n, dtype=dtype, device=device)
    for a, b in spans(n, chunk_size):
        s = sign[a:b].to(dtype)
        total = torch.zeros(b - a, dtype=acc_dtype(dtype), device=device)
        count = torch.zeros(b - a, dtype=acc_dtype(dtype), device=device)  # exact up to 2**24 tasks
        for v, t in zip(vectors, thresholds):
            c = trimmed(v, t, a, b)
            agree = (c * s) > 0
            total += torch.where(agree, c, 0)
            count += agree
        merged[a:b] = (total / count.clamp_min(1) * coef).to(dtype)
    return _shared(merged, len(vectors), coef)


# ----------------------------------------------------------------------------- TALL masks / consensus


def _lambdas(lam: float | Sequence[float], n_tasks: int) -> list[float]:
    lams = [lam] * n_tasks if isinstance(lam, (int, float)) else list(lam)
    if len(lams) != n_tasks:
        raise ValueError(f"got {len(lams)} lambdas for {n_tasks} tasks")
    for x in lams:
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0:
            raise ValueError(f"lambda must be a finite number >= 0, got {x!r}")
    return [float(x) for x in lams]


def _tall_pass(
    vectors: Sequence[Tensor], lams: list[float], chunk_size: int, pack: bool
) -> tuple[Tensor, list[Tensor], Tensor]:
    """One streaming pass: tau_MTL = sum_t tau_t (unscaled), the per-task TALL masks (packed or not)
    and the count of masks active at each parameter (what consensus thresholds)."""
    n, dtype = check_vectors(vectors)
    device = vectors[0].device
    if pack:
        chunk_size = -(-chunk_size // 8) * 8  # whole bytes per slice
    mtl = torch.empty(n, dtype=dtype, device=device)
    count = torch.empty(n, dtype=torch.int16 if len(vectors) < 2**15 else torch.int32, device=device)
    masks = [
        torch.empty(mask_nbytes(n) if pack else n, dtype=torch.uint8 if pack else torch.bool, device=device)
        for _ in vectors
    ]
    for a, b in spans(n, chunk_size):
        chunks = [v[a:b] for v in vectors]
        m_chunk = mtl[a:b]
        m_chunk.copy_(_scaled_sum_chunk(chunks, 1.0, a))
        cnt = count[a:b].zero_()
        for i, (c, lam) in enumerate(zip(chunks, lams)):
            m = c.abs() > lam * (m_chunk - c).abs()
            cnt += m
            if pack:
                masks[i][a // 8 : mask_nbytes(b)] = pack_mask(m)
            else:
                masks[i][a:b] = m
    return mtl, masks, count


def tall_masks(
    vectors: Sequence[Tensor],
    *,
    lam: float | Sequence[float],
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> MergeResult:
    """TALL masks (Wang et al., ICML 2024): tau_MTL = sum_t tau_t, unscaled;
    m_t = 1[|tau_t| > lam_t * |tau_MTL - tau_t|]; task t uses theta_0 + m_t * tau_MTL.

    Both the mask and the evaluated model use the *unscaled* sum, as the authors' code does
    (``generate_task_masks`` compares |theta_0 - theta_t| with |theta_0 + sum - theta_t|, and the
    masked model is evaluated at scaling coefficient 1.0): the mask keeps the weights where task t's
    own vector dominates what the rest of the merge adds, so scaling the sum would change which
    weights count as "dominated". There is therefore no ``coef``; ``lam`` is one value or one per
    task (the paper picks lambda_t per task on validation from ``LAMBDA_GRID``: see
    ``select_per_task``). Masks are stored bit-packed; ``merged`` is tau_MTL.
    """
    n, _ = check_vectors(vectors)
    lams = _lambdas(lam, len(vectors))
    mtl, masks, _ = _tall_pass(vectors, lams, chunk_size, pack=True)

    def per_task(i: int) -> Tensor:
        _check_task_index(i, len(vectors))
        return torch.where(unpack_mask(masks[i], n), mtl, 0)

    return MergeResult(mtl, per_task, 1.0, mask_nbytes(n), masks=list(masks))


def consensus(
    vectors: Sequence[Tensor],
    *,
    coef: float,
    lam: float | Sequence[float],
    k: int = 2,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> MergeResult:
    """Consensus merging (same paper): keep the weights that at least k TALL masks select ("selfish"
    weights go with k=2, "catastrophic" ones with k=1 as well) and scale the kept task-arithmetic
    vector: merged = coef * (1[count >= k] * sum_t tau_t); one model for all tasks.

    The masks are TALL's, built from the unscaled sum with ``lam`` (in the authors' code, the TALL
    masks already chosen per task on validation); ``coef`` only scales the result and is tuned on
    validation afterwards, as for task arithmetic.
    """
    coef = _check_coef(coef)
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k must be an int >= 0 (minimum number of agreeing masks), got {k!r}")
    lams = _lambdas(lam, len(vectors))
    mtl, _, count = _tall_pass(vectors, lams, chunk_size, pack=True)
    merged = torch.where(count >= k, mtl * coef, 0).to(mtl.dtype)
    return _shared(merged, len(vectors), coef)


# ----------------------------------------------------------------------------- EMR


def emr(
    vectors: Sequence[Tensor],
    *,
    rule: ElectRule = "sum",
    tie: TieRule = "negative",
    use_masks: bool = True,
    use_rescalers: bool = True,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> MergeResult:
    """EMR-Merging: unified vector tau_u, and task i uses lambda_i * (m_i * tau_u). Tuning-free
    (coef 1.0). Per-task state = packed mask (if used) + one float32 rescaler (if used)."""
    n, _ = check_vectors(vectors)
    unified, masks, rescalers = unify(
        vectors,
        rule=rule,
        tie=tie,
        use_masks=use_masks,
        use_rescalers=use_rescalers,
        chunk_size=chunk_size,
        pack=True,
    )

    def per_task(i: int) -> Tensor:
        _check_task_index(i, len(vectors))
        return reconstruct(unified, masks[i], rescalers[i])

    extra = (mask_nbytes(n) if use_masks else 0) + (RESCALER_BYTES if use_rescalers else 0)
    return MergeResult(
        unified,
        per_task,
        1.0,
        extra,
        masks=list(masks) if use_masks else [],
        rescalers=[float(r) for r in rescalers] if use_rescalers else [],
    )


MERGERS: dict[str, Callable[..., MergeResult]] = {
    "task_arithmetic": task_arithmetic,
    "ties": ties,
    "tall_masks": tall_masks,
    "consensus": consensus,
    "emr": emr,
}


# ----------------------------------------------------------------------------- validation selection


def grid(**axes: Iterable[Any]) -> list[dict[str, Any]]:
    """Cartesian product of keyword values, e.g. ``grid(coef=COEF_GRID, lam=LAMBDA_GRID)``."""
    names = list(axes)
    return [dict(zip(names, values)) for values in itertools.product(*(tuple(axes[k]) for k in names))]


def select_on_validation(
    evaluate: Callable[[MergeResult], float],
    candidates: Iterable[Mapping[str, Any]],
    build: Callable[..., MergeResult],
) -> tuple[dict[str, Any], float, list[tuple[dict[str, Any], float]]]:
    """Pick the hyper-parameters whose merge scores best under ``evaluate`` (higher is better).

    ``build(**kwargs)`` makes the merge for one candidate (e.g. ``functools.partial(ties, vectors)``)
    and ``evaluate`` must be the caller's *validation* metric: this function never touches data, so
    test sets stay out of model selection as long as the callback does. Candidates are built one at
    a time (one merged model in memory); on equal scores the earliest candidate wins, so the result
    is deterministic. Returns (best_kwargs, best_score, [(kwargs, score) for every candidate]).
    """
    scores: list[tuple[dict[str, Any], float]] = []
    best: tuple[dict[str, Any], float] | None = None
    for kwargs in candidates:
        kwargs = dict(kwargs)
        score = float(evaluate(build(**kwargs)))
        if math.isnan(score):
            raise ValueError(f"evaluate returned NaN for candidate {kwargs}")
        scores.append((kwargs, score))
        if best is None or score > best[1]:
            best = (kwargs, score)
    if best is None:
        raise ValueError("no candidates to select from")
    return best[0], best[1], scores


def select_per_task(
    evaluate_task: Callable[[MergeResult, int], float],
    candidates: Iterable[Mapping[str, Any]],
    build: Callable[..., MergeResult],
    n_tasks: int,
) -> tuple[list[dict[str, Any]], list[float], list[tuple[dict[str, Any], list[float]]]]:
    """Pick hyper-parameters *per task*: task i gets the candidate whose merge scores best on task i.

    This is how TALL masks choose lambda_t (``find_optimal_mask`` in the authors' code): every
    candidate builds one merge for all tasks, ``evaluate_task(result, i)`` scores task i on its own
    *validation* split, and each task keeps its own argmax, so tasks whose validation scores peak at
    different values end up with different hyper-parameters. Earliest candidate wins ties, as there.
    Returns (best kwargs per task, best score per task, [(kwargs, [score per task]) per candidate]).
    """
    table: list[tuple[dict[str, Any], list[float]]] = []
    for kwargs in candidates:
        kwargs = dict(kwargs)
        result = build(**kwargs)
        scores = [float(evaluate_task(result, i)) for i in range(n_tasks)]
        for i, score in enumerate(scores):
            if math.isnan(score):
                raise ValueError(f"evaluate_task returned NaN for task {i}, candidate {kwargs}")
        table.append((kwargs, scores))
    if not table:
        raise ValueError("no candidates to select from")
    best_idx = [max(range(len(table)), key=lambda c: (table[c][1][i], -c)) for i in range(n_tasks)]
    return [dict(table[c][0]) for c in best_idx], [table[c][1][i] for i, c in enumerate(best_idx)], table
