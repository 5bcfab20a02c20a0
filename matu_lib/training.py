"""Fine-tuning (one task, or several round-robin on one encoder), the shared trainer, and measuring accuracy.

The recipe is the task-vector literature's (AdamW, weight decay 0.1, linear warm-up then cosine decay,
gradient clipping at 1.0, frozen zero-shot head), with the learning rate and step count scaled for the
tiny offline models (see ``presets``). Runs are deterministic on CPU: shuffling uses an explicit
``torch.Generator`` seeded by the caller, and the CLIP image encoder has no dropout.

``finetune`` is the one training loop: every method trains through it, one task at a time (MaTU, per-task
FedAvg, local and individual fine-tuning) or round-robin over a client's tasks on one shared encoder
(FedAvg, FedProx, MaT-FL grouping). ``LocalTrainer`` turns flat task vectors into models and back, and
``derive_seed`` gives every (run, round, client, task) its own seed, so runs resume without saved RNG state.
"""

from __future__ import annotations

import contextlib
import math
import os
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .task_vectors import TaskVector

if TYPE_CHECKING:  # backbones imports open_clip: only the type is needed here
    from .backbones import Backbone, ImageClassifier

Data = tuple[torch.Tensor, torch.Tensor] | Dataset


@dataclass(frozen=True)
class FinetuneConfig:
    steps: int = 200
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 20
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1 or self.lr <= 0 or self.warmup_steps < 0:
            raise ValueError(f"invalid FinetuneConfig: {self}")


def progress(iterable, desc: str = "", total: int | None = None, enabled: bool | None = None):
    """A text tqdm bar that works headless (papermill, CI); ``MATU_PROGRESS=0`` silences all bars.

    Plain ``tqdm`` (not ``tqdm.auto``) so a missing widget frontend can never break a notebook.
    """
    if enabled is None:
        enabled = os.environ.get("MATU_PROGRESS", "1") != "0"
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False, mininterval=2.0, dynamic_ncols=True)


def data_size(data: Data) -> int:
    return len(data[0]) if isinstance(data, tuple) else len(data)


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA: matmuls and convolutions run in bf16 on tensor cores while parameters, gradients,
    optimiser state (hence task vectors) stay float32. Off elsewhere (CPU bf16 is slower than float32 on most
    CPUs) unless ``MATU_CPU_AUTOCAST=1``, which the tests use to exercise the same path on CPU."""
    enabled = device.type == "cuda" or os.environ.get("MATU_CPU_AUTOCAST", "0") == "1"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def loader_options(device: torch.device) -> dict:
    """DataLoader options for datasets read from disk: ``MATU_NUM_WORKERS`` decoding workers (0 = in-process)
    and pinned host memory when batches go to a GPU, so the copy can overlap compute (``non_blocking``)."""
    workers = int(os.environ.get("MATU_NUM_WORKERS", "0"))
    return {"num_workers": workers, "pin_memory": device.type == "cuda", "persistent_workers": False}


def batches(
    data: Data,
    batch_size: int,
    generator: torch.Generator | None = None,
    shuffle: bool = True,
    device: torch.device | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of batches. In-memory tensors are indexed directly (much faster than a DataLoader); datasets
    go through a DataLoader with ``loader_options(device)``."""
    if isinstance(data, tuple):
        x, y = data
        n = len(x)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        for i in range(0, n, batch_size):
            idx = order[i : i + batch_size]
            yield x[idx], y[idx]
    else:
        loader = DataLoader(
            data,
            batch_size=batch_size,
            shuffle=shuffle,
            generator=generator,
            **loader_options(device or torch.device("cpu")),
        )
        yield from loader


def infinite_batches(
    data: Data, batch_size: int, generator: torch.Generator, device: torch.device | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    while True:
        yield from batches(data, batch_size, generator, device=device)


def lr_factor(step: int, cfg: FinetuneConfig) -> float:
    """Linear warm-up to the peak, then cosine decay to zero."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    rest = max(cfg.steps - cfg.warmup_steps, 1)
    return 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup_steps) / rest))


def derive_seed(*parts: object) -> int:
    """A stable 31-bit seed from (run seed, round, client, task...): resumable without saved RNG state."""
    return zlib.crc32("/".join(map(str, parts)).encode()) & 0x7FFFFFFF


def prepared(model: nn.Module, data: Data) -> tuple[Data, bool]:
    """In-memory splits with their images replaced by the model's prepared inputs (``ImageClassifier.prepare``:
    normalised, and through a frozen stem where there is one), so that work is done once per split instead of at
    every step; datasets read from disk are returned as they are. The flag says which."""
    if isinstance(data, tuple) and hasattr(model, "prepare_split"):
        return (model.prepare_split(data[0]), data[1]), True
    return data, False


def finetune(
    model: nn.Module,
    data: Data | Mapping[str, Data],
    cfg: FinetuneConfig,
    seed: int,
    prox_to: dict[str, torch.Tensor] | None = None,
    prox_mu: float = 0.0,
    desc: str = "fine-tune",
    heads: Mapping[str, torch.Tensor] | None = None,
) -> list[float]:
    """Fine-tune ``model.visual`` in place for ``cfg.steps`` steps; returns the per-step training losses.

    One task: ``data`` is its split and ``model.head`` its frozen head; batches are shuffled by ``seed``.
    Several tasks on one encoder: ``data`` maps task -> split and ``heads`` task -> frozen head; step s trains
    on task s mod T with that task's head, each task drawing from its own stream seeded
    ``derive_seed(seed, task)`` (so adding a task does not reshuffle the others).
    ``prox_to``/``prox_mu`` add FedProx's proximal term mu/2 * ||w - w_start||^2 (0 disables it).
    """
    device = next(model.parameters()).device
    if heads is None:
        if data_size(data) == 0:
            raise ValueError("finetune: the training data is empty")
        tasks: list[str | None] = [None]
        data, ready = prepared(model, data)
        streams = {None: infinite_batches(data, cfg.batch_size, torch.Generator().manual_seed(seed), device)}
    else:
        if not isinstance(data, Mapping) or set(data) != set(heads) or not data:
            raise ValueError(
                f"finetune: with heads, data must map the same tasks to splits; got tasks "
                f"{sorted(data) if isinstance(data, Mapping) else type(data).__name__} and heads "
                f"{sorted(heads)}"
            )
        empty = [t for t in data if data_size(data[t]) == 0]
        if empty:
            raise ValueError(f"finetune: the training data of tasks {empty} is empty")
        tasks = list(data)
        ready = all(isinstance(data[t], tuple) for t in tasks) and hasattr(model, "prepare_split")
        if ready:  # every split in memory: all prepared, so each batch goes through ``logits`` alike
            data = {t: prepared(model, data[t])[0] for t in tasks}
        streams = {
            t: infinite_batches(data[t], cfg.batch_size, torch.Generator().manual_seed(derive_seed(seed, t)), device)
            for t in tasks
        }
    params = [p for p in model.visual.parameters() if p.requires_grad]  # the encoder; a frozen stem is not in it
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    named = dict(model.visual.named_parameters())
    losses: list[float] = []
    model.train()
    for step in progress(range(cfg.steps), desc=desc, total=cfg.steps):
        task = tasks[step % len(tasks)]
        if task is not None:
            model.head = heads[task]
        x, y = next(streams[task])
        x = x.to(device, non_blocking=True)
        with autocast(device):
            loss = F.cross_entropy(model.logits(x) if ready else model(x), y.to(device, non_blocking=True))
        if prox_to is not None and prox_mu > 0:
            loss = loss + 0.5 * prox_mu * sum(((named[k] - w0.to(device)) ** 2).sum() for k, w0 in prox_to.items())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


@dataclass
class LocalTrainer:
    """theta_0, the frozen zero-shot heads and the fine-tuning recipe: what every client of a run trains with.

    A model for task t is theta_0 + delta with the frozen zero-shot head of t, and training returns the new
    full task vector (theta_after - theta_0), which is what clients upload. One trainer is shared by all
    clients of a run (it holds theta_0 and the heads, never client data).
    """

    backbone: Backbone
    heads: dict[str, torch.Tensor]
    finetune_cfg: FinetuneConfig
    theta0: torch.Tensor = field(init=False)
    layout: list = field(init=False)

    def __post_init__(self) -> None:
        base = TaskVector(self.backbone.encoder_state())
        # theta_0 and every task vector live on the CPU whatever the training device: clients upload them, the
        # server aggregates them, and ``delta_of`` subtracts theta_0 from parameters it has moved to the CPU.
        self.theta0, self.layout = base.flatten().cpu(), base.layout()

    @property
    def n_params(self) -> int:
        return self.theta0.numel()

    def model(self, delta: torch.Tensor | None, task: str) -> ImageClassifier:
        state = None
        if delta is not None:
            state = TaskVector.unflatten(self.theta0 + delta.to(self.theta0), self.layout).vector
        return self.backbone.classifier(self.heads[task], state)

    def delta_of(self, model: ImageClassifier) -> torch.Tensor:
        return TaskVector({k: p.detach().cpu() for k, p in model.visual.named_parameters()}).flatten() - self.theta0

    def _steps(self, steps: int) -> FinetuneConfig:
        return FinetuneConfig(**{**self.finetune_cfg.__dict__, "steps": steps})

    def train_task(
        self, start: torch.Tensor | None, task: str, data: Data, steps: int, seed: int, prox_mu: float = 0.0
    ) -> torch.Tensor:
        """Fine-tune from theta_0 + start for ``steps`` steps; returns the new task vector (flat)."""
        model = self.model(start, task)
        prox = {k: p.detach().clone() for k, p in model.visual.named_parameters()} if prox_mu > 0 else None
        finetune(model, data, self._steps(steps), seed, prox_to=prox, prox_mu=prox_mu, desc=f"fine-tune {task}")
        return self.delta_of(model)

    def train_multitask(
        self, start: torch.Tensor | None, data: dict[str, Data], steps_per_task: int, seed: int, prox_mu: float = 0.0
    ) -> torch.Tensor:
        """One shared encoder trained round-robin over the client's tasks (each batch uses its task's head).

        This is how single-model baselines (FedAvg, FedProx, MaT-FL grouping) train a multi-task client,
        with the same number of optimiser steps per task as MaTU's per-task training.
        """
        tasks = list(data)
        model = self.model(start, tasks[0])
        heads = {t: self.heads[t].to(model.head) for t in tasks}
        prox = {k: p.detach().clone() for k, p in model.visual.named_parameters()} if prox_mu > 0 else None
        finetune(
            model,
            data,
            self._steps(steps_per_task * len(tasks)),
            seed,
            prox_to=prox,
            prox_mu=prox_mu,
            desc="fine-tune multi-task",
            heads=heads,
        )
        return self.delta_of(model)

    def evaluate(self, delta: torch.Tensor | None, task: str, data: Data, batch_size: int = 512) -> float:
        return accuracy(self.model(delta, task), data, batch_size)


@torch.no_grad()
def predict(model: nn.Module, data: Data, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted and true labels over ``data`` (in order)."""
    device = next(model.parameters()).device
    model.eval()
    data, ready = prepared(model, data)
    preds, labels = [], []
    for x, y in batches(data, batch_size, shuffle=False, device=device):
        x = x.to(device, non_blocking=True)
        with autocast(device):
            preds.append((model.logits(x) if ready else model(x)).argmax(-1).cpu())
        labels.append(y)
    return torch.cat(preds), torch.cat(labels)


def accuracy(model: nn.Module, data: Data, batch_size: int = 512) -> float:
    """Top-1 accuracy in [0, 1] (absolute, not normalised)."""
    pred, true = predict(model, data, batch_size)
    return float((pred == true).float().mean()) if len(true) else float("nan")
