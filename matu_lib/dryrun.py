"""A dry run of a real-data preset (``gpu``) on whatever device is here, then estimates for the full preset.

    python -m matu_lib run --preset gpu --dry-run                 # CPU: 4.5 CPU-minutes measured (2 threads)
    python -m matu_lib run --preset gpu --dry-run --dry-steps 4 --dry-batch 8 --dry-workers 4   # a GPU machine

Why: nobody has a GPU and the datasets on the project's machines, so the ``gpu`` preset's code path would first
run at a user's. The dry run executes that path end to end with what is available: the preset's backbone
(ViT-B-32) with random weights (``pretrained=None``), tiny fakes of three of its datasets written in their real
on-disk formats (``matu_lib.data.fake_real``) and read through torchvision, one MaTU round and one FedAvg round
of a few tiny steps on two clients, and evaluation. On the way it goes through everything device-specific:
modules and batches moved to ``cfg.device``, bf16 autocast (on CUDA), DataLoader workers and pinned memory,
the evaluation batch size. Then it measures what scales (parameters, bytes of each payload, activation bytes
per image, forward FLOPs per image, seconds per optimiser step) and extrapolates to the full preset. The
extrapolations are estimates, printed with their formulas; nothing is claimed about accuracy.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

# Formats torchvision reads without md5 checks (no patching needed) and few classes (cheap zero-shot heads).
DRY_TASKS = ("DTD", "EuroSAT", "RenderedSST2")


@dataclass(frozen=True)
class DryRunOptions:
    """The dry run's own scale: tiny by default so that it fits a CI job on 2 CPU cores."""

    tasks: tuple[str, ...] = DRY_TASKS
    n_clients: int = 2
    steps: int = 1  # optimiser steps per task per round
    batch_size: int = 2
    eval_batch_size: int = 4
    num_workers: int = 1  # DataLoader workers (0: decode in-process)
    device: str | None = None  # None: cuda when available, else cpu
    model: str | None = None  # None: the preset's backbone (tests may pass a small one to check the logic fast)
    gpu_tflops: float = 100.0  # ASSUMED sustained bf16 training throughput of the target GPU, for the estimate

    def __post_init__(self) -> None:
        if len(self.tasks) < 2 or self.n_clients < 1 or self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"invalid dry-run options: {self}")
        if self.eval_batch_size < 1 or self.num_workers < 0 or self.gpu_tflops <= 0:
            raise ValueError(f"invalid dry-run options: {self}")


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ------------------------------------------------------------------------------------------ measurements


def activation_bytes(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Bytes of the tensors autograd saves for backward in one training forward (parameters excluded), under
    the same autocast as training: the activation memory a training step holds at its peak."""
    from .training import autocast

    device = next(model.parameters()).device
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(device):
        loss = F.cross_entropy(model(x.to(device)), y.to(device))
    del loss
    return sum(seen.values())


def forward_flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one forward pass over ``x`` as torch counts them (matmuls and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x.to(next(model.parameters()).device))
    return int(counter.get_total_flops())


def seconds_per_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, repeats: int = 2) -> float:
    """Median wall time of a full training step (forward, backward, clipping, AdamW) after one warm-up step."""
    from .training import autocast

    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    x, y = x.to(device), y.to(device)
    times = []
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with autocast(device):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


# ------------------------------------------------------------------------------------------ estimates


def round_bytes(
    method: str,
    tasks_per_client: list[tuple[str, ...]],
    n_params: int,
    counts: list[dict[str, int]] | None = None,
    sketch_bits: int = 0,
) -> tuple[int, int]:
    """(bytes up, bytes down) of one round with every client sampled, from the payloads each method builds.

    The payloads are built with stand-in tensors of the right length (expanded, no memory), so the count is
    exactly ``Payload.nbytes`` -- the bytes the wire format serialises -- including the JSON header.
    """
    from .communication import Payload

    vec = torch.zeros(1).expand(n_params)
    mask = torch.zeros(1, dtype=torch.bool).expand(n_params)
    sketch = torch.zeros(1, dtype=torch.bool).expand(sketch_bits)  # MaTU's per-task update sketch (0: none sent)
    up = down = 0
    for k, tasks in enumerate(tasks_per_client):
        count = counts[k] if counts is not None else {t: 1000 for t in tasks}
        if method == "matu":
            up += Payload(
                k,
                tasks,
                {"unified": vec},
                {t: mask for t in tasks},
                {t: 1.0 for t in tasks},
                count,
                {t: sketch for t in tasks} if sketch_bits else {},
            ).nbytes()["total"]
            down += Payload(k, tasks, {"unified": vec}, {t: mask for t in tasks}, {t: 1.0 for t in tasks}, {}).nbytes()[
                "total"
            ]
        elif method == "fedavg":
            up += Payload(k, tasks, {"model": vec}, counts=count).nbytes()["total"]
            down += Payload(k, (), {"model": vec}).nbytes()["total"]
        else:
            raise ValueError(f"round_bytes knows 'matu' and 'fedavg', not {method!r}")
    return up, down


def full_preset_estimate(
    full,
    n_params: int,
    n_params_clip: int,
    act_per_image: float,
    flops_per_image: float,
    step_seconds: float,
    step_batch: int,
    gpu_tflops: float,
) -> dict:
    """Memory, bytes and time per round of the full preset, extrapolated from the dry run's measurements."""
    from .data import partition
    from .data.real import REAL_TASKS

    tasks = list(full.tasks) if full.tasks is not None else list(REAL_TASKS)
    # which client holds which task does not depend on the sizes (they only split samples), so any sizes do
    manifest = partition({t: 10_000 for t in tasks}, full.n_clients, full.tasks_per_client, seed=full.seed)
    held = [tuple(manifest.tasks_of(k)) for k in range(full.n_clients)]
    pairs = sum(len(h) for h in held)
    steps = pairs * full.local_steps  # MaTU: steps per (client, task); FedAvg: the same total, round-robin
    state = 4 * n_params_clip + 16 * n_params  # resident CLIP + trained copy, its grads and AdamW's two moments
    activations = act_per_image * full.batch_size
    matu_up, matu_down = round_bytes("matu", held, n_params, sketch_bits=getattr(full, "sketch_bits", 0))
    fedavg_up, fedavg_down = round_bytes("fedavg", held, n_params)
    return {
        "tasks": len(tasks),
        "clients": full.n_clients,
        "pairs": pairs,
        "steps_per_round": steps,
        "gpu_memory_bytes": state + activations,
        "state_bytes": state,
        "activation_bytes": activations,
        "matu_bytes_up": matu_up,
        "matu_bytes_down": matu_down,
        "fedavg_bytes_up": fedavg_up,
        "fedavg_bytes_down": fedavg_down,
        "gpu_seconds_per_round": 3 * flops_per_image * full.batch_size * steps / (gpu_tflops * 1e12),
        "here_seconds_per_round": step_seconds * full.batch_size / step_batch * steps,
    }


# ------------------------------------------------------------------------------------------ the dry run


def dry_run(
    preset_name: str = "gpu",
    seed: int = 0,
    options: DryRunOptions = DryRunOptions(),
    log: Callable[[str], None] = print,
) -> dict:
    """Run the preset's code path at toy scale here, then print estimates for the full preset; returns both."""
    from .data.fake_real import write_fake
    from .federation import build_context, run
    from .presets import preset

    full = preset(preset_name, seed=seed)
    if full.dataset != "real":
        raise ValueError(
            f"--dry-run exercises the real-data path; preset {preset_name!r} uses dataset={full.dataset!r}"
        )
    device = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
    per_client = min(2, len(options.tasks))
    cfg = replace(
        full,
        model=options.model or full.model,
        pretrained=None,
        download=False,
        device=device,
        tasks=options.tasks,
        n_clients=options.n_clients,
        tasks_per_client=(per_client, per_client),
        participation=1.0,
        rounds=1,
        local_steps=options.steps,
        batch_size=options.batch_size,
        eval_batch_size=options.eval_batch_size,
        warmup_steps=1,
    )
    log(
        f"dry run of preset {preset_name!r} on {device}: {cfg.model} with random weights, fake "
        f"{', '.join(options.tasks)}, {cfg.n_clients} clients, {options.steps} step(s) of batch {options.batch_size}, "
        f"{options.num_workers} DataLoader worker(s), eval batch {options.eval_batch_size}"
    )
    t_start = time.perf_counter()
    with (
        tempfile.TemporaryDirectory(prefix="matu-dryrun-") as root,
        _environ(MATU_REAL_DATA_DIR=root, MATU_NUM_WORKERS=str(options.num_workers)),
    ):
        for name in options.tasks:
            write_fake(name, root, seed=seed)
        ctx = build_context(cfg, log=log)
        rounds = {}
        for method in ("matu", "fedavg"):
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            result = run(ctx, method, out=None, log=log)
            entry = result.history[-1]
            rounds[method] = {
                "seconds": entry["seconds"],
                "bytes_up": entry["bytes_up"]["total"],
                "bytes_down": entry["bytes_down"]["total"],
                "mean_acc": entry["mean_acc"],
                "peak_gpu_bytes": (torch.cuda.max_memory_allocated() if device.startswith("cuda") else None),
            }
        # measurements that scale to the full preset
        trainer = ctx.trainer
        task = options.tasks[0]
        x, y = next(iter(torch.utils.data.DataLoader(ctx.train[task], batch_size=options.batch_size)))
        if x.shape[0] < options.batch_size:  # a tiny fake split: repeat its images up to the batch being measured
            reps = -(-options.batch_size // x.shape[0])
            x, y = x.repeat(reps, 1, 1, 1)[: options.batch_size], y.repeat(reps)[: options.batch_size]
        model = trainer.model(None, task)
        act = activation_bytes(model, x, y)
        flops = forward_flops(model, x[:1])
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        step = seconds_per_step(model, x, y)
        step_peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
        held = [c.tasks for c in ctx.clients]
        counts = [{t: c.count(t) for t in c.tasks} for c in ctx.clients]
        sketch_bits = getattr(cfg, "sketch_bits", 0)
        formula_ok = all(
            (rounds[m]["bytes_up"], rounds[m]["bytes_down"])
            == round_bytes(m, held, trainer.n_params, counts, sketch_bits if m == "matu" else 0)
            for m in ("matu", "fedavg")
        )
    n_clip = sum(p.numel() for p in trainer.backbone.model.parameters())
    est = full_preset_estimate(
        full, trainer.n_params, n_clip, act / options.batch_size, flops, step, options.batch_size, options.gpu_tflops
    )
    report = {
        "device": device,
        "seconds": round(time.perf_counter() - t_start, 1),
        "rounds": rounds,
        "n_params": trainer.n_params,
        "n_params_clip": n_clip,
        "activation_bytes_per_image": act / options.batch_size,
        "forward_flops_per_image": flops,
        "seconds_per_step": step,
        "step_batch": options.batch_size,
        "step_peak_gpu_bytes": step_peak,
        "bytes_formula_matches_dry_run": formula_ok,
        "estimate": est,
        "gpu_tflops": options.gpu_tflops,
    }
    log(format_report(report, full))
    return report


def _duration(seconds: float) -> str:
    """Seconds in the unit a reader wants: 2.9 min, 12.5 h."""
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.1f} min"


def format_report(report: dict, full) -> str:
    """The dry run's findings and the full-preset ESTIMATES, each with the formula that produced it."""
    e, gb = report["estimate"], 1e9
    P, Pc = report["n_params"], report["n_params_clip"]
    lines = [f"dry run on {report['device']}: done in {report['seconds']:.0f} s"]
    for method, r in report["rounds"].items():
        peak = (
            f", peak GPU memory {r['peak_gpu_bytes'] / 1e9:.2f} GB (allocated)"
            if r.get("peak_gpu_bytes") is not None
            else ""
        )
        lines.append(
            f"  {method:6s} 1 round: {r['seconds']:.1f} s{peak}, up {r['bytes_up']:,} B, down "
            f"{r['bytes_down']:,} B, mean acc {r['mean_acc']:.3f} (random weights, fake data: meaningless)"
        )
    lines += [
        f"  measured: encoder P = {P:,} params (CLIP total {Pc:,}); activations saved for backward "
        f"{report['activation_bytes_per_image'] / 1e6:.1f} MB/image; forward "
        f"{report['forward_flops_per_image'] / 1e9:.2f} "
        f"GFLOP/image; {report['seconds_per_step']:.3g} s per training step of batch {report['step_batch']} here",
        *(
            [
                f"  measured on {report['device']}: peak GPU memory of a training step of batch {report['step_batch']} "
                f"(forward, backward, AdamW): {report['step_peak_gpu_bytes'] / 1e9:.2f} GB allocated"
            ]
            if report.get("step_peak_gpu_bytes") is not None
            else []
        ),
        "  byte formula reproduces the dry run's measured bytes: "
        f"{'yes' if report['bytes_formula_matches_dry_run'] else 'NO'}",
        f"ESTIMATE for the full {full.preset!r} preset ({e['tasks']} tasks, {e['clients']} clients holding "
        f"{e['pairs']} (client, task) pairs, {full.local_steps} steps of batch {full.batch_size}; extrapolated from "
        "this dry run, not a full run):",
        f"  GPU memory per training process ~ {e['gpu_memory_bytes'] / gb:.1f} GB = 4*P_clip + 16*P "
        f"({e['state_bytes'] / gb:.2f} GB: model, trained copy, grads, AdamW moments) + activations/image x "
        f"{full.batch_size} ({e['activation_bytes'] / gb:.1f} GB; measured at this run's precision -- bf16 autocast "
        f"on a GPU stores less)",
        f"  bytes per round (all clients sampled, exact wire format): MaTU up {e['matu_bytes_up'] / gb:.2f} GB, down "
        f"{e['matu_bytes_down'] / gb:.2f} GB (per client 4*P + tasks*(ceil(P/8) + 4 + sketch bytes) + header); "
        "FedAvg up "
        f"{e['fedavg_bytes_up'] / gb:.2f} GB, down {e['fedavg_bytes_down'] / gb:.2f} GB (per client 4*P + header)",
        f"  training time per round ~ {e['gpu_seconds_per_round'] / 60:.1f} min on a GPU sustaining "
        f"{report['gpu_tflops']:.0f} TFLOP/s (ASSUMED) = 3 x forward FLOPs/image x {full.batch_size} x "
        f"{e['steps_per_round']} steps / throughput; {_duration(e['here_seconds_per_round'])} on this machine's "
        f"{report['device']} (measured step) = s/step x {full.batch_size}/{report['step_batch']} x steps. Excludes "
        "data loading, "
        f"evaluation and the server (see benchmarks/bench_aggregation.py)",
    ]
    return "\n".join(lines)
