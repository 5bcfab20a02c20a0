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

All functions take sequences of flat vectors and walk them in chunks, so the server never holds a
dense (tasks x params) stack beyond the per-task averages it must produce anyway.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import torch
from torch import Tensor

from .modulators import DEFAULT_CHUNK_SIZE, spans


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


def similarity_matrix(vectors: Sequence[Tensor], metric: str = "cosine",
                      chunk_size: int = DEFAULT_CHUNK_SIZE) -> Tensor:
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
    """tau_tilde_a = sum_b W[a, b] tau_b (skips zero weights: dissimilar tasks cost nothing)."""
    out = []
    for a in range(len(vectors)):
        acc = torch.zeros_like(vectors[a], dtype=torch.float32)
        for b, w in enumerate(weights[a].tolist()):
            if w > 0:
                acc.add_(vectors[b].float(), alpha=w)
        out.append(acc)
    return out


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
