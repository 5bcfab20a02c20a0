"""The MaTU server: stateless aggregation of unified uploads, with upload validation.

Stateless means the server object holds its configuration and nothing else: every round is a pure
function of that round's uploads (claim 4 of the paper). ``state_nbytes`` is therefore 0, and running
a round on a fresh server gives identical downloads (tested).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .aggregation import apply_transfer, similarity_matrix, sketch_similarity, transfer_weights
from .client import unify_payload
from .communication import Payload
from .modulators import average_reconstructions

log = logging.getLogger(__name__)


class UploadRejected(ValueError):
    """An upload that must not enter aggregation; the message says why."""


def validate_upload(upload: Payload, n_params: int, known_tasks: set[str], vector_names: set[str]) -> None:
    """Refuse NaN/Inf, wrong lengths, unknown tasks, and masks of the wrong length, with a reason."""
    unknown = [t for t in upload.tasks if t not in known_tasks]
    if unknown:
        raise UploadRejected(f"client {upload.client_id}: unknown task ids {unknown}")
    if set(upload.vectors) != vector_names:
        raise UploadRejected(f"client {upload.client_id}: expected vectors {sorted(vector_names)}, got {sorted(upload.vectors)}")
    for name, vec in upload.vectors.items():
        if vec.ndim != 1 or vec.numel() != n_params:
            raise UploadRejected(f"client {upload.client_id}: vector '{name}' has shape {tuple(vec.shape)}, expected ({n_params},)")
        if not torch.isfinite(vec).all():
            raise UploadRejected(f"client {upload.client_id}: vector '{name}' contains NaN or Inf")
    for task, mask in upload.masks.items():
        if task not in upload.tasks:
            raise UploadRejected(f"client {upload.client_id}: mask for task '{task}' it does not hold")
        if mask.numel() != n_params:
            raise UploadRejected(f"client {upload.client_id}: mask of task '{task}' has {mask.numel()} entries, expected {n_params}")
    for task, scale in upload.rescalers.items():
        if task not in upload.tasks or not math.isfinite(scale):
            raise UploadRejected(f"client {upload.client_id}: bad rescaler for task '{task}': {scale}")
    for task, bits in upload.sketches.items():
        if task not in upload.tasks or bits.dtype != torch.bool or bits.ndim != 1 or not 1 <= bits.numel() <= 65536:
            raise UploadRejected(f"client {upload.client_id}: bad sketch for task '{task}'")
    for task in upload.tasks:
        if upload.counts.get(task, 0) <= 0:
            raise UploadRejected(f"client {upload.client_id}: missing or non-positive sample count for task '{task}'")


def screen_uploads(uploads: list[Payload], n_params: int, known_tasks: set[str],
                   vector_names: set[str]) -> tuple[list[Payload], list[str]]:
    """Split uploads into accepted ones and logged rejection reasons; the round goes on with the rest."""
    accepted, rejected = [], []
    for upload in uploads:
        try:
            validate_upload(upload, n_params, known_tasks, vector_names)
            accepted.append(upload)
        except UploadRejected as err:
            log.warning("rejected upload: %s", err)
            rejected.append(str(err))
    return accepted, rejected


@dataclass(frozen=True)
class MaTUServer:
    """Stateless MaTU aggregation. Options mirror ``RunConfig``'s MaTU fields."""

    similarity: str = "cosine"
    transfer: bool = False
    temperature: float = 0.1
    threshold: float = 0.0
    rule: str = "sum"
    tie: str = "negative"
    use_masks: bool = True
    use_rescalers: bool = True
    scope: str = "client"
    magnitude: str = "max"
    device: str | None = None  # where aggregation arithmetic runs ("cuda": slice by slice on the GPU)

    state_nbytes = 0  # nothing is kept between rounds

    @classmethod
    def from_config(cls, cfg) -> "MaTUServer":
        """The server a ``RunConfig`` describes (in-process runner and Flower strategy alike)."""
        return cls(cfg.similarity, cfg.transfer, cfg.transfer_temperature, cfg.transfer_threshold, cfg.elect_rule,
                   cfg.tie_rule, cfg.use_masks, cfg.use_rescalers, cfg.unified_scope, cfg.magnitude,
                   cfg.device if str(cfg.device).startswith("cuda") else None)

    def aggregate(self, uploads: list[Payload]) -> tuple[dict[int, Payload], dict]:
        """One round: per-task averages -> similarity -> transfer -> per-client re-unification."""
        if not uploads:
            return {}, {"tasks": [], "similarity": [], "transfer": []}
        holders: dict[str, list[Payload]] = {}
        for up in uploads:
            for task in up.tasks:
                holders.setdefault(task, []).append(up)
        tasks = sorted(holders)
        # reconstruct + weighted average in one pass per slice over the uploads (no per-upload full vectors)
        averaged = [average_reconstructions([u.vectors["unified"] for u in holders[t]],
                                            [u.masks.get(t) for u in holders[t]],
                                            [u.rescalers.get(t, 1.0) for u in holders[t]],
                                            [float(u.counts[t]) for u in holders[t]], device=self.device)
                    for t in tasks]
        counts = {t: sum(float(u.counts[t]) for u in holders[t]) for t in tasks}
        by_vector = similarity_matrix(averaged, "sign" if self.similarity == "sign" else "cosine")
        by_sketch = self._sketch_similarity(uploads, tasks)
        if self.similarity == "sketch" and by_sketch is None:
            raise UploadRejected("similarity='sketch' but the uploads carry no sketches for every task")
        sim = by_sketch if self.similarity == "sketch" else by_vector
        weights = transfer_weights(sim, self.temperature, self.threshold) if self.transfer else torch.eye(len(tasks))
        # W = I (transfer off) maps every average to itself: skip T vector-sized copies
        shared = dict(zip(tasks, apply_transfer(averaged, weights) if self.transfer else averaged))
        options = (self.rule, self.tie, self.use_masks, self.use_rescalers, self.magnitude, self.device)
        downloads: dict[int, Payload] = {}
        if self.scope == "global":
            glob = unify_payload(-1, tasks, [shared[t] for t in tasks], {t: int(counts[t]) for t in tasks}, *options)
        for up in uploads:
            if self.scope == "global":
                downloads[up.client_id] = Payload(up.client_id, up.tasks, glob.vectors,
                                                  {t: glob.masks[t] for t in up.tasks if t in glob.masks},
                                                  {t: glob.rescalers[t] for t in up.tasks if t in glob.rescalers}, {})
            else:
                own = unify_payload(up.client_id, up.tasks, [shared[t] for t in up.tasks], {}, *options)
                downloads[up.client_id] = own
        info = {"tasks": tasks, "similarity": sim.tolist(), "transfer": weights.tolist(),
                "similarity_vector": by_vector.tolist()}
        if by_sketch is not None:
            info["similarity_sketch"] = by_sketch.tolist()
        return downloads, info

    @staticmethod
    def _sketch_similarity(uploads: list[Payload], tasks: list[str]) -> Tensor | None:
        """Similarity of this round's update sketches, or None when some task arrived without one."""
        groups: dict[str, list[Tensor]] = {t: [] for t in tasks}
        weights: dict[str, list[float]] = {t: [] for t in tasks}
        for up in uploads:
            for task, bits in up.sketches.items():
                if task in groups:
                    groups[task].append(bits)
                    weights[task].append(float(up.counts[task]))
        if not all(groups.values()) or len({b.numel() for g in groups.values() for b in g}) != 1:
            return None
        return sketch_similarity([groups[t] for t in tasks], [weights[t] for t in tasks])
