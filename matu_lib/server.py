"""The MaTU server: stateless aggregation of unified uploads, with upload validation.

Stateless means the server object holds its configuration and nothing else: every round is a pure
function of that round's uploads (claim 4 of the paper), and running a round on a fresh server gives
identical downloads (tested). That claim is measured, not declared: ``held_nbytes`` walks any server-side
object (this server, a method's server half, a Flower strategy) and sums the bytes of the tensors and byte
strings it holds, which is what every run reports as ``server_state_bytes``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .aggregation import Holding, server_round, sketch_similarity, transfer_weights
from .communication import MAX_SKETCH_BITS, Payload, code_vectors
from .presets import RunConfig

log = logging.getLogger(__name__)


# Bounds an honest upload never comes near; together they make every weighted sum below finite in float32
# (1e9 samples x 1e6 per entry x 1e4 clients = 1e19 << 3.4e38), so no upload can overflow aggregation.
MAX_SAMPLES = 10**9  # sample count per task
MAX_ABS_VALUE = 1e6  # |entry| of a task vector (fine-tuning deltas are ~1e-2)
MAX_ABS_RESCALER = 1e6


def held_nbytes(obj: Any, skip: frozenset[str] | set[str] = frozenset()) -> int:
    """Bytes of tensors, numpy arrays and byte strings reachable from ``obj`` (attributes, mappings, sequences).

    This is how server state is measured: walk the object the server keeps between rounds and add up the
    data it holds (configuration, ints and strings are not client data and count 0). Attributes named in
    ``skip`` are not walked (a method's handle on the in-process clients is not the server's). Each reference
    counts: a vector a server keeps for two clients counts twice, as a server storing it per client would.
    Containers are visited once, so cycles end.
    """
    seen: set[int] = set()

    def walk(x: Any, top: bool = False) -> int:
        if isinstance(x, torch.Tensor):
            return x.numel() * x.element_size()
        if isinstance(x, np.ndarray):
            return int(x.nbytes)
        if isinstance(x, (bytes, bytearray)):
            return len(x)
        if isinstance(x, memoryview):
            return x.nbytes
        if x is None or isinstance(x, (bool, int, float, complex, str, type)) or callable(x) and not top:
            return 0
        if id(x) in seen:
            return 0
        seen.add(id(x))
        if isinstance(x, dict):
            return sum(walk(k) + walk(v) for k, v in x.items())
        if isinstance(x, (list, tuple, set, frozenset)):
            return sum(walk(v) for v in x)
        fields: dict[str, Any] = dict(getattr(x, "__dict__", {}))
        for cls in type(x).__mro__:
            for name in getattr(cls, "__slots__", ()):
                if hasattr(x, name):
                    fields[name] = getattr(x, name)
        return sum(walk(v) for k, v in fields.items() if not (top and k in skip))

    return walk(obj, top=True)


class UploadRejected(ValueError):
    """An upload that must not enter aggregation; the message names the client and says why."""


def _count_ok(value: object) -> bool:
    """A positive, finite, integral sample count of at most ``MAX_SAMPLES`` (no bools, NaN, Inf, 1e300)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return math.isfinite(value) and float(value).is_integer() and 0 < value <= MAX_SAMPLES


def validate_upload(
    upload: Payload,
    n_params: int,
    known_tasks: set[str],
    vector_names: set[str],
    sender: int | None = None,
    holds: set[str] | None = None,
) -> None:
    """Refuse anything that must not enter aggregation, naming the client and the reason.

    ``sender`` is the client the transport says sent the upload (the runner or the Flower node map, never
    the payload's own claim); ``holds`` is the set of tasks that client holds, when the server knows it.
    """
    who = f"client {sender if sender is not None else upload.client_id}"
    if not isinstance(upload, Payload):
        raise UploadRejected(f"{who}: upload is a {type(upload).__name__}, not a Payload")
    fields = ("vectors", "masks", "rescalers", "counts", "sketches")
    bad = [f for f in fields if not isinstance(getattr(upload, f, None), dict)]
    if bad:
        raise UploadRejected(f"{who}: upload fields {bad} are not mappings")
    if sender is not None and (isinstance(upload.client_id, bool) or upload.client_id != sender):
        raise UploadRejected(f"{who}: upload claims to come from client {upload.client_id!r}")
    tasks = upload.tasks
    if not isinstance(tasks, tuple) or not tasks or not all(isinstance(t, str) for t in tasks):
        raise UploadRejected(f"{who}: task list must be a non-empty tuple of task ids, got {tasks!r}"[:200])
    if len(set(tasks)) != len(tasks):
        raise UploadRejected(f"{who}: duplicate task ids {sorted({t for t in tasks if tasks.count(t) > 1})}")
    unknown = [t for t in tasks if t not in known_tasks]
    if unknown:
        raise UploadRejected(f"{who}: unknown task ids {unknown}")
    if holds is not None and not set(tasks) <= holds:
        raise UploadRejected(
            f"{who}: tasks {sorted(set(tasks) - holds)} are not this client's (it holds {sorted(holds)})"
        )
    if set(upload.vectors) != vector_names:
        raise UploadRejected(f"{who}: expected vectors {sorted(vector_names)}, got {sorted(upload.vectors)}")
    for name, vec in upload.vectors.items():
        if not isinstance(vec, torch.Tensor) or not vec.is_floating_point():
            raise UploadRejected(f"{who}: vector '{name}' is not a float tensor")
        if vec.ndim != 1 or vec.numel() != n_params:
            raise UploadRejected(f"{who}: vector '{name}' has shape {tuple(vec.shape)}, expected ({n_params},)")
        if not torch.isfinite(vec).all():
            raise UploadRejected(f"{who}: vector '{name}' contains NaN or Inf")
        if vec.abs().max() > MAX_ABS_VALUE:
            raise UploadRejected(f"{who}: vector '{name}' has entries above {MAX_ABS_VALUE:g} in magnitude")
    for task, mask in upload.masks.items():
        if task not in tasks:
            raise UploadRejected(f"{who}: mask for task '{task}' it does not hold")
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.ndim != 1 or mask.numel() != n_params:
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise UploadRejected(f"{who}: mask of task '{task}' has {shape}, expected {n_params} bool entries")
    for task, bits in upload.sketches.items():
        if task not in tasks:
            raise UploadRejected(f"{who}: sketch for task '{task}' it does not hold")
        if (
            not isinstance(bits, torch.Tensor)
            or bits.dtype != torch.bool
            or bits.ndim != 1
            or bits.numel() > MAX_SKETCH_BITS
        ):
            raise UploadRejected(f"{who}: sketch of task '{task}' must be at most {MAX_SKETCH_BITS} bool entries")
    for task, scale in upload.rescalers.items():
        ok = isinstance(scale, (int, float)) and not isinstance(scale, bool) and math.isfinite(scale)
        if task not in tasks or not ok or abs(scale) > MAX_ABS_RESCALER:
            raise UploadRejected(f"{who}: bad rescaler for task '{task}': {scale!r}"[:200])
    extra = sorted(set(upload.counts) - set(tasks), key=str)
    if extra:
        raise UploadRejected(f"{who}: sample counts for tasks it does not upload: {extra}"[:200])
    for task in tasks:
        if not _count_ok(upload.counts.get(task)):
            raise UploadRejected(
                f"{who}: sample count for task '{task}' must be an integer in [1, {MAX_SAMPLES:.0e}], "
                f"got {upload.counts.get(task)!r}"[:200]
            )


def screen_uploads(
    uploads: list[Payload],
    n_params: int,
    known_tasks: set[str],
    vector_names: set[str] | Callable[[Payload], set[str]],
    senders: list[int] | None = None,
    holdings: dict[int, set[str]] | None = None,
) -> tuple[list[Payload], list[str]]:
    """Split uploads into accepted ones and logged rejection reasons; the round goes on with the rest.

    ``vector_names`` is the set of vectors every upload must carry, or a function of the upload giving it
    (per-task FedAvg: one vector per task the upload names).

    ``senders[i]`` is who the transport says sent ``uploads[i]``; ``holdings[k]`` the tasks client k holds.
    With senders, a second upload from the same sender is rejected too (one upload per client per round).
    """
    if senders is not None and len(senders) != len(uploads):
        raise ValueError(f"screen_uploads: {len(uploads)} uploads but {len(senders)} senders")
    accepted, rejected, seen = [], [], set()
    for i, upload in enumerate(uploads):
        sender = senders[i] if senders is not None else None
        try:
            holds = holdings.get(sender, set()) if holdings is not None and sender is not None else None
            names = vector_names(upload) if callable(vector_names) and isinstance(upload, Payload) else vector_names
            validate_upload(upload, n_params, known_tasks, names, sender, holds)
            if sender is not None and sender in seen:
                raise UploadRejected(f"client {sender}: more than one upload this round")
            seen.add(sender)
            accepted.append(upload)
        except UploadRejected as err:
            log.warning("rejected upload: %s", err)
            rejected.append(str(err))
    return accepted, rejected


_DEFAULT = RunConfig()  # MaTU's defaults are RunConfig's: a server built without a config agrees with a run


@dataclass(frozen=True)
class MaTUServer:
    """Stateless MaTU aggregation. Options mirror ``RunConfig``'s MaTU fields, and so do their defaults.

    ``from_config(cfg)`` is how the runner and the Flower strategy build it; the field defaults are read from
    ``RunConfig`` (never declared a second time), so ``MaTUServer()`` aggregates as a default run does.
    """

    similarity: str = _DEFAULT.similarity
    transfer: bool = _DEFAULT.transfer
    temperature: float = _DEFAULT.transfer_temperature
    threshold: float = _DEFAULT.transfer_threshold
    rule: str = _DEFAULT.elect_rule
    tie: str = _DEFAULT.tie_rule
    use_masks: bool = _DEFAULT.use_masks
    use_rescalers: bool = _DEFAULT.use_rescalers
    scope: str = _DEFAULT.unified_scope
    magnitude: str = _DEFAULT.magnitude
    download_bits: int = _DEFAULT.download_bits  # how downloads' unified vectors travel (32: float32 as is)
    download_topk: float = _DEFAULT.download_topk
    code_block: int = _DEFAULT.code_block
    device: str | None = None  # where aggregation arithmetic runs ("cuda": slice by slice on the GPU)

    @classmethod
    def from_config(cls, cfg) -> MaTUServer:
        """The server a ``RunConfig`` describes (in-process runner and Flower strategy alike)."""
        return cls(
            cfg.similarity,
            cfg.transfer,
            cfg.transfer_temperature,
            cfg.transfer_threshold,
            cfg.elect_rule,
            cfg.tie_rule,
            cfg.use_masks,
            cfg.use_rescalers,
            cfg.unified_scope,
            cfg.magnitude,
            cfg.download_bits,
            cfg.download_topk,
            cfg.code_block,
            cfg.device if str(cfg.device).startswith("cuda") else None,
        )

    def aggregate(self, uploads: list[Payload], consume: bool = False) -> tuple[dict[int, Payload], dict]:
        """One round: per-task averages -> similarity -> transfer -> per-client re-unification.

        ``consume=True`` lets the round write each client's download over that client's upload (its unified vector
        and bool masks), where their sizes match: for a caller that owns the uploads (decoded from bytes, kept by
        nobody else), it saves allocating and first-touching the downloads, the largest cost of a round at
        ViT-B/32 scale after the arithmetic. The uploads are unusable afterwards."""
        if not uploads:
            return {}, {"tasks": [], "similarity": [], "transfer": []}
        holders: dict[str, list[Payload]] = {}
        for up in uploads:
            for task in up.tasks:
                holders.setdefault(task, []).append(up)
        tasks = sorted(holders)
        by_sketch = self._sketch_similarity(uploads, tasks)
        if self.similarity == "sketch" and by_sketch is None:
            raise UploadRejected("similarity='sketch' but the uploads carry no sketches for every task")
        weights = torch.eye(len(tasks))

        def transfer(by_vector: Tensor) -> Tensor:  # W from whichever similarity drives the transfer
            nonlocal weights
            weights = transfer_weights(
                by_sketch if self.similarity == "sketch" else by_vector, self.temperature, self.threshold
            )
            return weights

        # reconstruct + average + similarity + (transfer) + re-unify, streamed slice by slice over the uploads
        position = {id(u): k for k, u in enumerate(uploads)}
        holdings = {
            t: [
                Holding(position[id(u)], u.masks.get(t), u.rescalers.get(t, 1.0), float(u.counts[t]))
                for u in holders[t]
            ]
            for t in tasks
        }
        groups = [tuple(tasks)] if self.scope == "global" else [tuple(up.tasks) for up in uploads]
        result = server_round(
            [u.vectors["unified"] for u in uploads],
            holdings,
            groups,
            "sign" if self.similarity == "sign" else "cosine",
            transfer if self.transfer else None,
            rule=self.rule,
            tie=self.tie,
            magnitude=self.magnitude,
            use_masks=self.use_masks,
            use_rescalers=self.use_rescalers,
            device=self.device,
            out=self._buffers(uploads) if consume else None,
        )
        by_vector = result.similarity
        sim = by_sketch if self.similarity == "sketch" else by_vector

        coded: dict[int, dict] = {}  # each unified vector coded once (global scope: one for every client)

        def payload(client_id: int, index: int, keep: tuple[str, ...]) -> Payload:
            unified, masks, scales = result.outputs[index]
            if index not in coded:
                coded[index] = code_vectors(
                    {"unified": unified}, self.download_bits, self.download_topk, self.code_block
                )
            return Payload(
                client_id,
                keep,
                {"unified": unified},
                {t: m for t, m in zip(groups[index], masks) if t in keep} if self.use_masks else {},
                {t: r for t, r in zip(groups[index], scales) if t in keep} if self.use_rescalers else {},
                {},
                coded=dict(coded[index]),
            )

        downloads: dict[int, Payload] = {}
        for k, up in enumerate(uploads):
            index = 0 if self.scope == "global" else k
            downloads[up.client_id] = payload(up.client_id, index, tuple(up.tasks))
        info = {
            "tasks": tasks,
            "similarity": sim.tolist(),
            "transfer": weights.tolist(),
            "similarity_vector": by_vector.tolist(),
        }
        if by_sketch is not None:
            info["similarity_sketch"] = by_sketch.tolist()
        return downloads, info

    def _buffers(self, uploads: list[Payload]) -> list[tuple[Tensor, list[Tensor]]] | None:
        """The uploads' own tensors as download buffers, or None where one does not fit (global scope, a
        missing or non-bool mask, a vector that is not contiguous float32, or two uploads sharing memory)."""
        if self.scope == "global":
            return None
        out, seen = [], set()
        for up in uploads:
            u = up.vectors["unified"]
            masks = [up.masks.get(t) for t in up.tasks]
            tensors = [u, *masks]
            if (
                u.dtype != torch.float32
                or not all(isinstance(m, Tensor) and m.dtype == torch.bool for m in masks)
                or not all(t.is_contiguous() for t in tensors)
                or any(t.untyped_storage().data_ptr() in seen for t in tensors)
            ):
                return None
            seen.update(t.untyped_storage().data_ptr() for t in tensors)
            out.append((u, masks))
        return out

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
