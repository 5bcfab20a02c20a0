"""Clients: each holds several tasks (its data shard per task) and its own modulators.

``LocalTrainer`` turns flat task vectors into models and back: a model for task t is
theta_0 + delta with the frozen zero-shot head of t, and training returns the new full task vector
(theta_after - theta_0), which is what MaTU clients unify and upload. One trainer is shared by all
clients of a run (it holds theta_0 and the heads, never client data).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .aggregation import sign_sketch
from .backbones import Backbone, ImageClassifier
from .communication import Payload
from .modulators import reconstruct, unify
from .task_vectors import TaskVector
from .training import (Data, FinetuneConfig, accuracy, autocast, data_size, finetune, infinite_batches, lr_factor,
                       progress)


def derive_seed(*parts: object) -> int:
    """A stable 31-bit seed from (run seed, round, client, task...): resumable without saved RNG state."""
    return zlib.crc32("/".join(map(str, parts)).encode()) & 0x7FFFFFFF


@dataclass
class LocalTrainer:
    backbone: Backbone
    heads: dict[str, Tensor]
    finetune_cfg: FinetuneConfig
    theta0: Tensor = field(init=False)
    layout: list = field(init=False)

    def __post_init__(self) -> None:
        base = TaskVector(self.backbone.encoder_state())
        # theta_0 and every task vector live on the CPU whatever the training device: clients upload them, the
        # server aggregates them, and ``delta_of`` subtracts theta_0 from parameters it has moved to the CPU.
        self.theta0, self.layout = base.flatten().cpu(), base.layout()

    @property
    def n_params(self) -> int:
        return self.theta0.numel()

    def model(self, delta: Tensor | None, task: str) -> ImageClassifier:
        state = None
        if delta is not None:
            state = TaskVector.unflatten(self.theta0 + delta.to(self.theta0), self.layout).vector
        return self.backbone.classifier(self.heads[task], state)

    def delta_of(self, model: ImageClassifier) -> Tensor:
        return TaskVector({k: p.detach().cpu() for k, p in model.visual.named_parameters()}).flatten() - self.theta0

    def train_task(self, start: Tensor | None, task: str, data: Data, steps: int, seed: int,
                   prox_mu: float = 0.0) -> Tensor:
        """Fine-tune from theta_0 + start for ``steps`` steps; returns the new task vector (flat)."""
        model = self.model(start, task)
        prox = {k: p.detach().clone() for k, p in model.visual.named_parameters()} if prox_mu > 0 else None
        cfg = FinetuneConfig(**{**self.finetune_cfg.__dict__, "steps": steps})
        finetune(model, data, cfg, seed, prox_to=prox, prox_mu=prox_mu, desc=f"fine-tune {task}")
        return self.delta_of(model)

    def train_multitask(self, start: Tensor | None, data: dict[str, Data], steps_per_task: int, seed: int,
                        prox_mu: float = 0.0) -> Tensor:
        """One shared encoder trained round-robin over the client's tasks (each batch uses its task's head).

        This is how single-model baselines (FedAvg, FedProx, MaT-FL grouping) train a multi-task client,
        with the same number of optimiser steps per task as MaTU's per-task training.
        """
        import torch.nn.functional as F

        tasks = list(data)
        model = self.model(start, tasks[0])
        heads = {t: self.heads[t].to(model.head) for t in tasks}
        w0 = {k: p.detach().clone() for k, p in model.visual.named_parameters()} if prox_mu > 0 else None
        cfg = FinetuneConfig(**{**self.finetune_cfg.__dict__, "steps": steps_per_task * len(tasks)})
        params = list(model.visual.parameters())
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
        device = model.head.device
        streams = {t: infinite_batches(data[t], cfg.batch_size, torch.Generator().manual_seed(derive_seed(seed, t)),
                                       device) for t in tasks}
        named = dict(model.visual.named_parameters())
        model.train()
        for step in progress(range(cfg.steps), desc="fine-tune multi-task", total=cfg.steps):
            task = tasks[step % len(tasks)]
            model.head = heads[task]
            x, y = next(streams[task])
            with autocast(device):
                loss = F.cross_entropy(model(x.to(device, non_blocking=True)), y.to(device, non_blocking=True))
            if w0 is not None:
                loss = loss + 0.5 * prox_mu * sum(((named[k] - w) ** 2).sum() for k, w in w0.items())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            sched.step()
        model.eval()
        return self.delta_of(model)

    def evaluate(self, delta: Tensor | None, task: str, data: Data, batch_size: int = 512) -> float:
        return accuracy(self.model(delta, task), data, batch_size)


@dataclass
class Client:
    """A client: its task shards and, for MaTU, the modulated vector it received last.

    ``residual`` is MaTU's optional error feedback (client state, never sent): per task, what the last
    unification dropped from the vector the client meant to upload. Adding it to the next round's vector
    lets a coordinate that lost the sign election once still count later, instead of being lost for good.
    """

    client_id: int
    data: dict[str, Data]                  # task -> its shard of that task's train split
    download: Payload | None = None        # MaTU: unified vector + this client's masks and rescalers
    residual: dict[str, Tensor] = field(default_factory=dict)  # MaTU error feedback (empty when off)
    learned: dict[str, Tensor] = field(default_factory=dict)   # sum of this client's own updates per task (sketches)

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

    def matu_round(self, trainer: LocalTrainer, steps: int, seed: int, rule: str = "sum", tie: str = "negative",
                   use_masks: bool = True, use_rescalers: bool = True, error_feedback: bool = False,
                   magnitude: str = "max", sketch_bits: int = 0, sketch_source: str = "round") -> Payload:
        """Fine-tune each task from its modulated start, unify the task vectors, and build the upload.

        With ``error_feedback`` the client adds each task's residual from its previous upload before
        unifying, and keeps the new residual (intended minus reconstructable) for the next round.
        With ``sketch_bits`` > 0 it also sends, per task, a sign sketch of this round's *update* (trained
        minus start): what the task learned now, not where the shared unified vector put it. With
        ``sketch_source="cumulative"`` the sketch is of the sum of this client's updates so far (client state,
        never sent): the same signal, with less noise than one short round.
        """
        starts = {t: self.modulated(t) for t in self.tasks}
        vectors = [trainer.train_task(starts[t], t, self.data[t], steps, derive_seed(seed, self.client_id, t))
                   for t in self.tasks]
        sketches = {}
        if sketch_bits > 0:
            updates = {t: v if starts[t] is None else v - starts[t] for t, v in zip(self.tasks, vectors)}
            if sketch_source == "cumulative":
                self.learned = {t: u + self.learned[t] if t in self.learned else u for t, u in updates.items()}
                updates = self.learned
            sketches = {t: sign_sketch(u, sketch_bits) for t, u in updates.items()}
        if error_feedback:
            vectors = [v + self.residual[t] if t in self.residual else v for t, v in zip(self.tasks, vectors)]
        gpu = trainer.backbone.device if trainer.backbone.device.type == "cuda" else None  # unify slice by slice there
        upload = unify_payload(self.client_id, self.tasks, vectors, {t: self.count(t) for t in self.tasks},
                               rule, tie, use_masks, use_rescalers, magnitude, gpu)
        self.residual = ({t: v - payload_task_vector(upload, t) for t, v in zip(self.tasks, vectors)}
                         if error_feedback else {})
        upload.sketches = sketches
        return upload


def matu_options(cfg) -> dict:
    """``Client.matu_round``'s MaTU options as a ``RunConfig`` sets them (in-process runner and Flower alike)."""
    return {"rule": cfg.elect_rule, "tie": cfg.tie_rule, "use_masks": cfg.use_masks,
            "use_rescalers": cfg.use_rescalers, "error_feedback": cfg.error_feedback, "magnitude": cfg.magnitude,
            "sketch_bits": cfg.sketch_bits, "sketch_source": cfg.sketch_source}


def unify_payload(client_id: int, tasks: Sequence[str], vectors: Sequence[Tensor], counts: dict[str, int],
                  rule: str, tie: str, use_masks: bool, use_rescalers: bool, magnitude: str = "max",
                  device: str | torch.device | None = None) -> Payload:
    """EMR-unify ``vectors`` (one per task) into one vector plus per-task masks and rescalers.

    Without masks nothing per-task is sent (all-ones masks are implied), so the ablation's bytes are honest.
    """
    unified, masks, scales = unify(list(vectors), rule=rule, tie=tie, use_masks=use_masks, use_rescalers=use_rescalers,
                                   magnitude=magnitude, device=device)
    return Payload(client_id, tuple(tasks), {"unified": unified},
                   {t: m for t, m in zip(tasks, masks)} if use_masks else {},
                   {t: s for t, s in zip(tasks, scales)} if use_rescalers else {}, dict(counts))


def payload_task_vector(payload: Payload, task: str) -> Tensor:
    """Reconstruct task ``task`` from a unified payload (absent masks/rescalers mean all-ones / 1.0)."""
    unified = payload.vectors["unified"]
    mask = payload.masks.get(task)
    if mask is None:
        mask = torch.ones(unified.numel(), dtype=torch.bool)
    return reconstruct(unified, mask, payload.rescalers.get(task, 1.0))
