"""MaTU's server-side aggregation as pure functions: averaging, task similarity, knowledge transfer.

The paper's body is not available; this follows its abstract ("determines task similarity based on the
direction of clients' task vectors and constructs a unified task vector") and EMR-Merging. The
reconstruction implemented here (see README, "What is reconstructed"):

1. reconstruct every (client, task) vector from its upload: lambda_t * (m_t * tau_u^k);
2. average per task, weighted by sample counts: tau_bar_t;
3. similarity from direction: S = cosine(tau_bar_a, tau_bar_b), or sign agreement;
4. transfer: tau_tilde_a = sum_b W[a, b] tau_bar_b, W[a, :] = softmax(S[a, b] / T) over b with
   S[a, b] > threshold (a itself always kept). Related tasks share; dissimilar ones get weight 0;
   ``W = I`` (transfer off) keeps tasks apart.

All functions take sequences of flat vectors and walk them in chunks. The server's round itself
(``server_round``) streams steps 1-4 and the re-unification slice by slice, so it never holds a dense
(tasks x params) stack, not even of the per-task averages.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from .modulators import DEFAULT_CHUNK_SIZE, mask_nbytes, spans


def weighted_average(vectors: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """sum_i w_i v_i / sum_i w_i (sample-weighted FedAvg of vectors)."""
    if len(vectors) == 0 or len(vectors) != len(weights):
        raise ValueError(f"weighted_average: {len(vectors)} vectors vs {len(weights)} weights")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("weighted_average: weights must sum to a positive number")
    out = torch.zeros_like(vectors[0], dtype=torch.float32)
    for v, w in zip(vectors, weights):
        out.add_(v.float(), alpha=float(w) / total)
    return out


def similarity_matrix(
    vectors: Sequence[Tensor], metric: str = "cosine", chunk_size: int = DEFAULT_CHUNK_SIZE
) -> Tensor:
    """Task similarity from direction, [T, T] in [-1, 1], unit diagonal (for non-zero vectors).

    ``cosine``: normalised dot products. ``sign``: mean over parameters of sign(a) * sign(b), i.e.
    (agreeing - disagreeing signs) / n, which is 1 for identical directions and ~0 for unrelated ones.
    """
    if metric not in ("cosine", "sign"):
        raise ValueError(f"unknown similarity metric '{metric}' (use 'cosine' or 'sign')")
    n = vectors[0].numel()
    gram = torch.zeros(len(vectors), len(vectors), dtype=torch.float64)
    for a, b in spans(n, chunk_size):
        block = torch.stack([v[a:b] for v in vectors]).double()
        if metric == "sign":
            block = torch.sign(block)
        gram += block @ block.T
    return similarity_from_gram(gram, metric, n)


def similarity_from_gram(gram: Tensor, metric: str, n: int) -> Tensor:
    """``similarity_matrix`` from the float64 Gram matrix of the vectors (or of their signs, for "sign")."""
    if metric == "sign":
        sim = gram / n
        sim.fill_diagonal_(1.0)
    else:
        norms = gram.diagonal().sqrt().clamp_min(1e-30)
        sim = gram / norms[:, None] / norms[None, :]
    return sim.float().clamp(-1, 1)


def transfer_weights(similarity: Tensor, temperature: float = 0.1, threshold: float = 0.0) -> Tensor:
    """Row-stochastic W from S: softmax(S / T) over related tasks (S > threshold), self always included."""
    if temperature <= 0:
        raise ValueError("transfer temperature must be > 0")
    keep = similarity > threshold
    keep.fill_diagonal_(True)
    logits = torch.where(keep, similarity / temperature, torch.full_like(similarity, float("-inf")))
    return torch.softmax(logits, dim=1)


def apply_transfer(vectors: Sequence[Tensor], weights: Tensor) -> list[Tensor]:
    """tau_tilde_a = sum_b W[a, b] tau_b (skips zero weights: dissimilar tasks cost nothing).

    Each term is rounded before it is added (no fused multiply-add), as in the server's fused round."""
    out = []
    for a in range(len(vectors)):
        acc = torch.zeros_like(vectors[a], dtype=torch.float32)
        for b, w in enumerate(weights[a].tolist()):
            if w > 0:
                acc += vectors[b].float() * w
        out.append(acc)
    return out


# ------------------------------------------------------------------------ the fused server round


@dataclass(frozen=True)
class Holding:
    """One (upload, task) pair as the server averages it: upload index, mask (bool, packed or None = all ones),
    rescaler and sample weight."""

    upload: int
    mask: Tensor | None
    rescaler: float
    weight: float


@dataclass
class RoundResult:
    """What one fused round produces: per download group (tau_u, masks, rescalers), the similarity of the task
    averages (``metric``), the transfer weights used, and the wall time of each pass."""

    outputs: list[tuple[Tensor, list[Tensor], list[float]]]
    similarity: Tensor
    transfer: Tensor | None
    seconds: float


def server_round(
    uploads: Sequence[Tensor],
    holders: dict[str, list[Holding]],
    groups: Sequence[Sequence[str]],
    metric: str = "cosine",
    transfer: Callable[[Tensor], Tensor | None] | None = None,
    *,
    rule: str,
    tie: str,
    magnitude: str,
    use_masks: bool,
    use_rescalers: bool,
    pack: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    device: str | torch.device | None = None,
    backend: str = "auto",
    out: Sequence[tuple[Tensor, Sequence[Tensor]]] | None = None,
) -> RoundResult:
    """The MaTU server's arithmetic for one round, streamed: per-task averages of the reconstructed uploads, their
    similarity (``metric``), optional transfer, and the unification of each download group (a client's tasks, or
    every task for one global vector).

    Why streamed: the plain round materialises every task's average (a tasks x params stack, 5 GB at 15 tasks of
    ViT-B/32) before re-unifying. Here each slice of columns is read once from the uploads, averaged, measured and
    re-unified while it is in cache, so the round holds its inputs, its outputs and one slice per worker. Without
    transfer that is one pass; with transfer, the weights depend on the similarity of the *whole* averages, so a
    first pass measures it and a second recomputes the averages slice by slice (reading the uploads twice costs
    less than holding the stack). ``transfer(similarity)`` returns W (rows: receiving task) or None.

    Tasks are ``sorted(holders)``; each average is ``sum_h ((u_h * r_h) masked) * w_h / sum_h w_h`` in float32
    (each term rounded before it is added). Raises OverflowError naming the task if an average is not finite.

    ``out[g] = (tau_u, masks)`` are buffers to write group g's download into instead of new ones. They may be the
    uploads' own buffers (a server that owns its decoded uploads): every slice is read in full before any output
    of it is written, and fresh memory costs more than the arithmetic (the kernel writes 8 GB of downloads at
    ViT-B/32 scale; first-touching new pages ran at ~2-4 GB/s here against ~13 GB/s into existing ones).
    """
    import time

    from .modulators import BIT_WEIGHTS, mask_slice, rescaler_ratio, unify_block, use_kernels

    tasks = sorted(holders)
    if not tasks:
        raise ValueError("server_round: no task has a holder")
    index = {t: i for i, t in enumerate(tasks)}
    for g in groups:
        if not g or any(t not in index for t in g):
            raise ValueError(f"server_round: download group {tuple(g)} names a task nobody uploaded")
    if metric not in ("cosine", "sign"):
        raise ValueError(f"unknown similarity metric '{metric}' (use 'cosine' or 'sign')")
    totals = {t: float(sum(h.weight for h in holders[t])) for t in tasks}
    for t in tasks:
        if not (math.isfinite(totals[t]) and totals[t] > 0) or not all(math.isfinite(h.rescaler) for h in holders[t]):
            raise OverflowError(f"weighted average of task '{t}' overflowed; were the uploads screened?")
    n = uploads[0].numel()
    home = uploads[0].device
    work = torch.device(device) if device is not None else home
    if out is not None:
        _check_out(out, groups, n, pack, home)
    masks_in = [h.mask for t in tasks for h in holders[t] if h.mask is not None]
    t0 = time.perf_counter()
    if use_kernels(backend, work, list(uploads)) and all(m.device.type == "cpu" for m in masks_in):
        result = _server_round_kernels(
            uploads,
            holders,
            tasks,
            index,
            totals,
            groups,
            metric,
            transfer,
            rule,
            tie,
            magnitude,
            use_masks,
            use_rescalers,
            pack,
            n,
            out,
        )
        if result is not None:
            result.seconds = time.perf_counter() - t0
            return result
        if out is not None:  # the buffers may be the uploads, now partly overwritten: nothing to recompute from
            raise OverflowError("server round: a task average or an elected sum overflowed; were the uploads screened?")
        # an average was not finite: the torch pass below finds the task and raises
    T = len(tasks)
    span = -(-min(chunk_size, n) // 8) * 8
    weights_bits = BIT_WEIGHTS.to(work)

    def averages(a: int, b: int) -> Tensor:
        avg = torch.empty(T, b - a, dtype=torch.float32, device=work)
        for ti, t in enumerate(tasks):
            acc = None
            for h in holders[t]:
                part = uploads[h.upload][a:b].to(work, non_blocking=True) * h.rescaler
                m = mask_slice(h.mask, a, b, n)
                if m is not None:
                    part = torch.where(m.to(work, non_blocking=True), part, 0)
                acc = part * h.weight if acc is None else acc.add_(part * h.weight)
            avg[ti] = acc.div_(totals[t])
            if not bool(torch.isfinite(avg[ti]).all()):
                raise OverflowError(f"weighted average of task '{t}' overflowed; were the uploads screened?")
        return avg

    def gram_of(avg: Tensor) -> Tensor:
        x = (torch.sign(avg) if metric == "sign" else avg).double()
        return (x @ x.T).cpu()

    gram = torch.zeros(T, T, dtype=torch.float64)
    mix = None
    if transfer is not None:  # first pass: the similarity the transfer weights depend on
        for a, b in spans(n, span):
            gram += gram_of(averages(a, b))
        mix = transfer(similarity_from_gram(gram, metric, n))
    outputs = [
        (u, list(m), [0.0] * len(g), [0.0] * len(g))
        for g, (u, m) in zip(groups, out if out is not None else _new_outputs(groups, n, pack, home))
    ]
    for a, b in spans(n, span):
        avg = averages(a, b)
        if transfer is None:
            gram += gram_of(avg)
        shared = avg
        if mix is not None:
            shared = torch.zeros_like(avg)
            for ti in range(T):
                for bi, c in enumerate(mix[ti].tolist()):
                    if c > 0:
                        shared[ti] += avg[bi] * c
        for g, (u_out, m_out, num, den) in zip(groups, outputs):
            u, m, num_c, den_c = unify_block(
                shared[[index[t] for t in g]], rule, tie, magnitude, use_masks, pack, weights_bits
            )
            u_out[a:b].copy_(u, non_blocking=True)
            for mi, row in zip(m_out, m):
                (mi[a // 8 : mask_nbytes(b)] if pack else mi[a:b]).copy_(row, non_blocking=True)
            for i, (x, y) in enumerate(zip(num_c.tolist(), den_c.tolist())):
                num[i] += x
                den[i] += y
    if work.type == "cuda":
        torch.cuda.synchronize(work)
    results = [
        (u, m, [rescaler_ratio(x, y) if use_rescalers else 1.0 for x, y in zip(num, den)]) for u, m, num, den in outputs
    ]
    return RoundResult(results, similarity_from_gram(gram, metric, n), mix, time.perf_counter() - t0)


def _mask_layout(n: int, pack: bool) -> tuple[int, torch.dtype]:
    """Entries and dtype of one download mask over n parameters: packed bytes, or one bool per parameter."""
    return (mask_nbytes(n), torch.uint8) if pack else (n, torch.bool)


def _new_outputs(
    groups: Sequence[Sequence[str]], n: int, pack: bool, device: torch.device
) -> list[tuple[Tensor, list[Tensor]]]:
    """Fresh download buffers: per group a tau_u and one mask per task (bool, or packed bytes)."""
    shape, dtype = _mask_layout(n, pack)
    return [
        (
            torch.empty(n, dtype=torch.float32, device=device),
            [torch.empty(shape, dtype=dtype, device=device) for _ in g],
        )
        for g in groups
    ]


def _check_out(out, groups, n: int, pack: bool, device: torch.device) -> None:
    """``server_round``'s ``out`` buffers: one (tau_u, masks) per group, of the sizes and types it writes."""
    shape, dtype = _mask_layout(n, pack)
    if len(out) != len(groups):
        raise ValueError(f"server_round: {len(out)} output buffers for {len(groups)} download groups")
    for g, (u, masks) in zip(groups, out):
        ok = (
            u.dtype == torch.float32
            and u.numel() == n
            and u.is_contiguous()
            and u.device == device
            and len(masks) == len(g)
            and all(m.dtype == dtype and m.numel() == shape and m.is_contiguous() and m.device == device for m in masks)
        )
        if not ok:
            raise ValueError(
                f"server_round: output buffers of group {tuple(g)} are not a contiguous float32 "
                f"tau_u of {n} entries and {len(g)} {dtype} masks of {shape} on {device}"
            )


def _server_round_kernels(
    uploads,
    holders,
    tasks,
    index,
    totals,
    groups,
    metric,
    transfer,
    rule,
    tie,
    magnitude,
    use_masks,
    use_rescalers,
    pack,
    n,
    out=None,
) -> RoundResult | None:
    """``server_round`` with the compiled kernel (``kernels.server_round_kernel``); None if an average overflowed."""
    import numpy as np

    from . import kernels
    from .modulators import rescaler_ratio

    T = len(tasks)
    flat = [h for t in tasks for h in holders[t]]
    mask_arrays = [np.zeros(1, np.uint8)]  # index 0: the dummy for "no mask"
    kinds, mask_index = [], []
    for h in flat:
        if h.mask is None:
            kinds.append(kernels.MASK_NONE)
            mask_index.append(0)
        else:
            kinds.append(kernels.MASK_BOOL if h.mask.dtype == torch.bool else kernels.MASK_PACKED)
            mask_index.append(len(mask_arrays))
            mask_arrays.append(h.mask.contiguous().view(torch.uint8).numpy())
    starts = np.cumsum([0] + [len(holders[t]) for t in tasks]).astype(np.int64)
    up_list = kernels.typed_list([u.numpy() for u in uploads])
    m_list = kernels.typed_list(mask_arrays)
    common = dict(
        masks=m_list,
        mask_kind=np.array(kinds, np.int64),
        holder_start=starts,
        holder_upload=np.array([h.upload for h in flat], np.int64),
        holder_mask=np.array(mask_index, np.int64),
        holder_rescale=np.array([h.rescaler for h in flat], np.float32),
        holder_weight=np.array([h.weight for h in flat], np.float32),
        totals=np.array([totals[t] for t in tasks], np.float32),
        n=n,
        block=kernels.block_columns(2 * T),
        majority=rule == "majority",
        tie=kernels.TIES[tie],
        mean=magnitude == "mean",
        use_masks=use_masks,
        pack=pack,
    )
    gram_mode = 2 if metric == "sign" else 1
    gram = np.zeros((kernels.N_GROUPS, T, T), np.float64)
    bad = np.zeros(kernels.N_GROUPS, np.uint8)
    dummy_u = kernels.typed_list([np.zeros(1, np.float32)])
    dummy_m = kernels.typed_list([np.zeros(1, np.uint8)])
    no_groups = np.zeros(1, np.int64)
    slots = np.zeros((kernels.N_GROUPS, 1), np.float64)

    def similarity() -> Tensor:
        g = torch.from_numpy(gram.sum(axis=0))
        return similarity_from_gram(torch.triu(g) + torch.triu(g, 1).T, metric, n)

    mix = None
    if transfer is not None:
        kernels.match_torch_threads()
        kernels.server_round_kernel(
            uploads=up_list,
            gram_mode=gram_mode,
            transfer=False,
            mix=np.zeros((1, 1), np.float32),
            group_start=no_groups,
            group_rows=no_groups,
            n_out=0,
            out_u=dummy_u,
            out_m=dummy_m,
            gram=gram,
            num=slots,
            den=slots,
            bad=bad,
            **common,
        )
        if bad.any():
            return None
        mix = transfer(similarity())
    group_start = np.cumsum([0] + [len(g) for g in groups]).astype(np.int64)
    group_rows = np.array([index[t] for g in groups for t in g], np.int64)
    buffers = out if out is not None else _new_outputs(groups, n, pack, torch.device("cpu"))
    out_u = [u for u, _ in buffers]
    out_m = [list(m) for _, m in buffers]
    num = np.zeros((kernels.N_GROUPS, int(group_start[-1])), np.float64)
    den = np.zeros_like(num)
    kernels.match_torch_threads()
    kernels.server_round_kernel(
        uploads=up_list,
        gram_mode=0 if transfer is not None else gram_mode,
        transfer=mix is not None,
        mix=(mix.float().numpy() if mix is not None else np.zeros((1, 1), np.float32)),
        group_start=group_start,
        group_rows=group_rows,
        n_out=len(groups),
        out_u=kernels.typed_list([u.numpy() for u in out_u]),
        out_m=kernels.typed_list([m.view(torch.uint8).numpy() for ms in out_m for m in ms]),
        gram=gram,
        num=num,
        den=den,
        bad=bad,
        **common,
    )
    if bad.any():
        return None
    num_t, den_t = num.sum(axis=0).tolist(), den.sum(axis=0).tolist()
    outputs = []
    for k, (u, m) in enumerate(zip(out_u, out_m)):
        a, b = int(group_start[k]), int(group_start[k + 1])
        outputs.append((u, m, [rescaler_ratio(x, y) if use_rescalers else 1.0 for x, y in zip(num_t[a:b], den_t[a:b])]))
    return RoundResult(outputs, similarity(), mix, 0.0)


# ------------------------------------------------------------------------ sketches of update directions

SKETCH_SEED = 0x5EED5  # shared by every client and the server: the projection must be the same everywhere


@lru_cache(maxsize=4)
def _count_sketch(n: int, bits: int, seed: int) -> tuple[Tensor, Tensor]:
    """Bucket and sign of each parameter (a sparse random projection, Charikar et al.'s count sketch)."""
    gen = torch.Generator().manual_seed(seed)
    buckets = torch.randint(bits, (n,), generator=gen, dtype=torch.int64)
    signs = torch.randint(2, (n,), generator=gen, dtype=torch.int8).float().mul_(2).sub_(1)
    return buckets, signs


def sign_sketch(vector: Tensor, bits: int = 1024, seed: int = SKETCH_SEED) -> Tensor:
    """SimHash-style sign bits of a seeded random projection of ``vector``: ``bits`` booleans.

    Two vectors at angle theta agree on a fraction of about 1 - theta / pi of the bits, so a few hundred bytes
    per task let the server compare the *directions* of what tasks learned without receiving the vectors.
    The projection is a count sketch (one bucket and one random sign per parameter), which costs one pass.
    """
    if bits < 1:
        raise ValueError(f"sketch bits must be >= 1, got {bits}")
    buckets, signs = _count_sketch(vector.numel(), bits, seed)
    projected = torch.zeros(bits, dtype=torch.float64).index_add_(0, buckets, (vector.double().flatten() * signs))
    return projected > 0


def centre_updates(updates: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """One client's per-task updates scaled to unit length, minus their mean: what is particular to each task.

    Every task a client trains moves partly along directions that have little to do with the task: a drift
    that any fine-tuning of this encoder takes, and (after the first round) the way back from the shared,
    modulated start that all of the client's tasks begin at. In sign bits that common part outweighs what a task
    learned, so the server's sketch similarity grouped tasks by client rather than by family. Subtracting the
    client's mean unit update removes it before the signs are taken (after them it no longer adds up to something
    the server could subtract; docs/method.md). Unit length first, so that one task's larger update does not
    become the others' "common" part. A client holding one task has nothing to centre on: its update is returned
    unchanged. With two tasks
    the two centred updates are opposite, so the server sees them as unrelated or opposed; clients hold tasks of
    different families by default (``spread_families``), which is what this assumes.
    """
    if len(updates) < 2:
        return dict(updates)
    units = {t: u / u.norm().clamp_min(1e-30) for t, u in updates.items()}
    mean = torch.stack(list(units.values())).mean(dim=0)
    return {t: u - mean for t, u in units.items()}


def sketch_similarity(sketches: Sequence[Sequence[Tensor]], weights: Sequence[Sequence[float]] | None = None) -> Tensor:
    """Task similarity from sign sketches: ``sketches[a]`` holds task a's sketches from the clients that hold it.

    Each task's sketches become +-1 vectors averaged over its holders (weighted by samples); c = cosine of two
    averages, mapped to sin(pi c / 2), the SimHash estimate of the cosine of the underlying directions (exact in
    expectation for one sketch per task: agreement 1 - theta / pi gives c = 1 - 2 theta / pi).
    """
    means = []
    for a, group in enumerate(sketches):
        w = weights[a] if weights is not None else [1.0] * len(group)
        acc = sum(float(wi) * (s.double() * 2 - 1) for s, wi in zip(group, w))
        means.append(acc / max(float(sum(w)), 1e-30))
    stack = torch.stack(means)
    norms = stack.norm(dim=1).clamp_min(1e-30)
    cos = (stack @ stack.T) / norms[:, None] / norms[None, :]
    return torch.sin(cos.clamp(-1, 1) * (math.pi / 2)).float()
