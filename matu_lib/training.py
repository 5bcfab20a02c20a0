"""Fine-tuning one task and measuring accuracy.

The recipe is the task-vector literature's (AdamW, weight decay 0.1, linear warm-up then cosine decay,
gradient clipping at 1.0, frozen zero-shot head), with the learning rate and step count scaled for the
tiny offline models (see ``presets``). Runs are deterministic on CPU: shuffling uses an explicit
``torch.Generator`` seeded by the caller, and the CLIP image encoder has no dropout.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

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


def batches(data: Data, batch_size: int, generator: torch.Generator | None = None,
            shuffle: bool = True, device: torch.device | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of batches. In-memory tensors are indexed directly (much faster than a DataLoader); datasets
    go through a DataLoader with ``loader_options(device)``."""
    if isinstance(data, tuple):
        x, y = data
        n = len(x)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        for i in range(0, n, batch_size):
            idx = order[i:i + batch_size]
            yield x[idx], y[idx]
    else:
        loader = DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=generator,
                            **loader_options(device or torch.device("cpu")))
        yield from loader


def infinite_batches(data: Data, batch_size: int, generator: torch.Generator,
                     device: torch.device | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    while True:
        yield from batches(data, batch_size, generator, device=device)


def lr_factor(step: int, cfg: FinetuneConfig) -> float:
    """Linear warm-up to the peak, then cosine decay to zero."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    rest = max(cfg.steps - cfg.warmup_steps, 1)
    return 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup_steps) / rest))


def finetune(model: nn.Module, data: Data, cfg: FinetuneConfig, seed: int,
             prox_to: dict[str, torch.Tensor] | None = None, prox_mu: float = 0.0,
             desc: str = "fine-tune") -> list[float]:
    """Fine-tune ``model.visual`` in place on ``data``; returns the per-step training losses.

    ``prox_to``/``prox_mu`` add FedProx's proximal term mu/2 * ||w - w_start||^2 (0 disables it).
    """
    if data_size(data) == 0:
        raise ValueError("finetune: the training data is empty")
    device = next(model.parameters()).device
    params = [p for p in model.visual.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    gen = torch.Generator().manual_seed(seed)
    stream = infinite_batches(data, cfg.batch_size, gen, device)
    named = dict(model.visual.named_parameters())
    losses: list[float] = []
    model.train()
    for _ in progress(range(cfg.steps), desc=desc, total=cfg.steps):
        x, y = next(stream)
        with autocast(device):
            loss = F.cross_entropy(model(x.to(device, non_blocking=True)), y.to(device, non_blocking=True))
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


@torch.no_grad()
def predict(model: nn.Module, data: Data, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted and true labels over ``data`` (in order)."""
    device = next(model.parameters()).device
    model.eval()
    preds, labels = [], []
    for x, y in batches(data, batch_size, shuffle=False, device=device):
        with autocast(device):
            preds.append(model(x.to(device, non_blocking=True)).argmax(-1).cpu())
        labels.append(y)
    return torch.cat(preds), torch.cat(labels)


def accuracy(model: nn.Module, data: Data, batch_size: int = 512) -> float:
    """Top-1 accuracy in [0, 1] (absolute, not normalised)."""
    pred, true = predict(model, data, batch_size)
    return float((pred == true).float().mean()) if len(true) else float("nan")
