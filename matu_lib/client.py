"""The MaTU client: its task shards, the download it trains from, and its client-only state.

A client fine-tunes each of its tasks from the vector it reconstructs out of its last download, unifies
the results into one upload (``communication.unify_payload``), and keeps what must never leave it (error
feedback residuals, summed updates behind cumulative sketches). The trainer it uses and seed derivation
live with training (``training.LocalTrainer``, ``training.derive_seed``); payload coding lives with the
wire format (``communication``). Their old names stay importable from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .aggregation import centre_updates, sign_sketch
from .communication import Payload, payload_task_vector, unify_payload
from .modulators import as_bool_mask
from .training import Data, LocalTrainer, data_size, derive_seed

__all__ = ["Client", "LocalTrainer", "derive_seed", "matu_options", "payload_task_vector", "unify_payload"]


@dataclass
class Client:
    """A client: its task shards and, for MaTU, the modulated vector it received last.

    ``residual`` is MaTU's optional error feedback (client state, never sent): per task, what the last
    unification dropped from the vector the client meant to upload. Adding it to the next round's vector
    lets a coordinate that lost the sign election once still count later, instead of being lost for good.
    """

    client_id: int
    data: dict[str, Data]  # task -> its shard of that task's train split
    download: Payload | None = None  # MaTU: unified vector + this client's masks and rescalers
    residual: dict[str, Tensor] = field(default_factory=dict)  # MaTU error feedback (empty when off)
    learned: dict[str, Tensor] = field(default_factory=dict)  # sum of this client's own updates per task (sketches)
    kept: dict[str, Tensor] = field(default_factory=dict)  # its last trained vector per task (``fill_dropped``)

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.data)

    def count(self, task: str) -> int:
        return data_size(self.data[task])

    def modulated(self, task: str) -> Tensor | None:
        """theta_t - theta_0 as this client sees it: lambda_t * (m_t * tau_u), or None before round 1."""
        if self.download is None:
            return None
        return payload_task_vector(self.download, task)

    def filled(self, task: str) -> Tensor | None:
        """The modulated vector with the coordinates its mask drops taken from ``kept`` (``fill_dropped``).

        Unification keeps, per task, the coordinates whose sign agrees with the unified vector; the others arrive
        as 0 and would otherwise restart from the pretrained weight every round. The client's own last trained
        vector of the task is its best knowledge of them: it never travels, so the server stays stateless and the
        upload is unchanged. Without a kept vector (round 1) or a mask this is ``modulated``."""
        vector = self.modulated(task)
        own = self.kept.get(task)
        mask = self.download.masks.get(task) if self.download is not None else None
        if vector is None or own is None or mask is None:
            return vector
        return torch.where(as_bool_mask(mask, vector.numel()), vector, own)

    def model(self, task: str, fill: str) -> Tensor | None:
        """The task vector this client uses for ``task``: ``filled`` with ``fill="model"``, else ``modulated``."""
        return self.filled(task) if fill == "model" else self.modulated(task)

    def matu_round(
        self,
        trainer: LocalTrainer,
        steps: int,
        seed: int,
        *,
        rule: str,
        tie: str,
        use_masks: bool,
        use_rescalers: bool,
        error_feedback: bool,
        magnitude: str,
        sketch_bits: int,
        sketch_source: str,
        sketch_center: str,
        bits: int,
        fraction: float,
        block: int,
        fill: str,
    ) -> Payload:
        """Fine-tune each task from its modulated start, unify the task vectors, and build the upload.

        Every MaTU option is explicit (``**matu_options(cfg)`` passes a ``RunConfig``'s): the defaults live in
        ``RunConfig`` alone, so no caller can silently run with another set.

        With ``error_feedback`` the client adds each task's residual from its previous upload before
        unifying, and keeps the new residual (intended minus reconstructable) for the next round. With ``bits``
        < 32 or ``fraction`` < 1 the unified vector travels coded (``communication.code_vectors``); the residual is
        taken against the decoded upload, so error feedback absorbs what coding drops as well as unification.
        With ``sketch_bits`` > 0 it also sends, per task, a sign sketch of this round's *update* (trained
        minus start): what the task learned now, not where the shared unified vector put it. With
        ``sketch_source="cumulative"`` the sketch is of the sum of this client's updates so far (client state,
        never sent): the same signal, with less noise than one short round. With ``sketch_center="client"``
        the updates are centred over the client's tasks first (``aggregation.centre_updates``).
        With ``fill`` other than "none" each task starts from ``filled`` and the client keeps its trained vectors
        for the next round's fill (``kept``).
        """
        starts = {t: self.modulated(t) if fill == "none" else self.filled(t) for t in self.tasks}
        vectors = [
            trainer.train_task(starts[t], t, self.data[t], steps, derive_seed(seed, self.client_id, t))
            for t in self.tasks
        ]
        self.kept = dict(zip(self.tasks, vectors)) if fill != "none" else {}
        sketches = {}
        if sketch_bits > 0:
            updates = {t: v if starts[t] is None else v - starts[t] for t, v in zip(self.tasks, vectors)}
            if sketch_source == "cumulative":
                self.learned = {t: u + self.learned[t] if t in self.learned else u for t, u in updates.items()}
                updates = self.learned
            if sketch_center == "client":
                updates = centre_updates(updates)
            sketches = {t: sign_sketch(u, sketch_bits) for t, u in updates.items()}
        if error_feedback:
            vectors = [v + self.residual[t] if t in self.residual else v for t, v in zip(self.tasks, vectors)]
        gpu = trainer.backbone.device if trainer.backbone.device.type == "cuda" else None  # unify slice by slice there
        upload = unify_payload(
            self.client_id,
            self.tasks,
            vectors,
            {t: self.count(t) for t in self.tasks},
            rule,
            tie,
            use_masks,
            use_rescalers,
            magnitude,
            gpu,
            bits,
            fraction,
            block,
        )
        self.residual = (
            {t: v - payload_task_vector(upload, t) for t, v in zip(self.tasks, vectors)} if error_feedback else {}
        )
        upload.sketches = sketches
        return upload


def matu_options(cfg) -> dict:
    """``Client.matu_round``'s MaTU options as a ``RunConfig`` sets them (in-process runner and Flower alike)."""
    return {
        "rule": cfg.elect_rule,
        "tie": cfg.tie_rule,
        "use_masks": cfg.use_masks,
        "use_rescalers": cfg.use_rescalers,
        "error_feedback": cfg.error_feedback,
        "magnitude": cfg.magnitude,
        "sketch_bits": cfg.sketch_bits,
        "sketch_source": cfg.sketch_source,
        "sketch_center": cfg.sketch_center,
        "bits": cfg.upload_bits,
        "fraction": cfg.upload_topk,
        "block": cfg.code_block,
        "fill": cfg.fill_dropped,
    }
