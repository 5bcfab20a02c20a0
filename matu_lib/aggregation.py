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

from collections.abc import Sequence

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
