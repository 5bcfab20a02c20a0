"""The in-process federation runner: the context (clients, data, model), rounds, evaluation, metrics, resume.

    ctx = build_context(preset("cpu"))
    result = run(ctx, "matu", out="results/cpu/matu")

Results folders and checkpoints are ``matu_lib.results_folder``'s; comparisons of several methods and seeds
are ``matu_lib.comparison``'s. Resume is exact: every random choice derives its seed from (run seed, round, client,
task), and the
method's state is saved after every round: one safetensors file holding state, progress and a content
hash, committed by one rename and verified on resume; ``metrics.jsonl`` is rewritten from it on resume.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .backbones import load_backbone
from .client import Client
from .methods import METHODS, FedContext, Method, RoundResult
from .presets import RunConfig, check_runnable, partition_for
from .results_folder import (
    CHECKPOINT_FILE,
    atomic_write,
    config_id,
    folder_config,
    kill_point,
    load_checkpoint,
    prepare_folder,
    release_folder,
    rewrite_metrics_jsonl,
    save_checkpoint,
)
from .training import Data, FinetuneConfig, LocalTrainer

VOLATILE = ("seconds", "seconds_total", "server_seconds")  # timing fields: excluded when comparing runs for determinism


def without_timings(obj):
    """``obj`` (nested dicts/lists of a history or summary) without timing fields: what must be reproducible."""
    if isinstance(obj, dict):
        return {k: without_timings(v) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [without_timings(v) for v in obj]
    return obj


# ------------------------------------------------------------------------------------------- context


def _task_splits(cfg: RunConfig) -> tuple[dict[str, Data], dict[str, Data], dict[str, Data], dict, dict]:
    """Train/val/test per task, class names and templates, and train labels (for Dirichlet splits)."""
    from .data import get_task, list_tasks, load_suite

    if cfg.dataset == "real":
        from .data import REAL_TASKS

        names = list(cfg.tasks) if cfg.tasks is not None else list(REAL_TASKS)
    else:
        names = list(cfg.tasks) if cfg.tasks is not None else list_tasks()
    train, val, test, specs, labels = {}, {}, {}, {}, {}
    if cfg.dataset == "real":
        from .data.real import real_splits

        for name in names:
            train[name], val[name], test[name], specs[name] = real_splits(name, cfg.seed, download=cfg.download)
            labels[name] = None
        return train, val, test, specs, labels
    for name, task in load_suite(names, seed=cfg.seed).items():
        x, y = task.split("train")
        if cfg.max_train_per_task is not None and len(x) > cfg.max_train_per_task:
            keep = torch.randperm(len(x), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.max_train_per_task]
            x, y = x[keep.sort().values], y[keep.sort().values]
        train[name], val[name], test[name] = (x, y), task.split("val"), task.split("test")
        specs[name], labels[name] = get_task(name), y
    return train, val, test, specs, labels


def build_context(cfg: RunConfig, log: Callable[[str], None] = print) -> FedContext:
    """Load backbone, heads, tasks and the client partition for ``cfg`` (deterministic from cfg.seed).

    ``presets.check_runnable`` runs first, so a device, model or partition that cannot work is refused in one
    line before any data is loaded."""
    check_runnable(cfg)
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    train, val, test, specs, labels = _task_splits(cfg)
    backbone = load_backbone(cfg.model, cfg.pretrained, cfg.device)
    heads = {t: backbone.head(specs[t].classes, specs[t].templates) for t in train}
    ft = FinetuneConfig(
        steps=cfg.local_steps,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_steps,
        grad_clip=cfg.grad_clip,
    )
    sizes = {t: len(train[t][0]) if isinstance(train[t], tuple) else len(train[t]) for t in train}
    manifest = partition_for(cfg, sizes, labels)
    clients = []
    for k in range(cfg.n_clients):
        shards = {}
        for t in manifest.tasks_of(k):
            idx = torch.tensor(manifest.indices(k, t), dtype=torch.long)
            shards[t] = (
                (train[t][0][idx], train[t][1][idx])
                if isinstance(train[t], tuple)
                else torch.utils.data.Subset(train[t], idx.tolist())
            )
        clients.append(Client(k, shards))
    ctx = FedContext(cfg, LocalTrainer(backbone, heads, ft), clients, train, val, test)
    ctx.cache["manifest"] = manifest
    log(
        f"context: {len(train)} tasks, {cfg.n_clients} clients, {ctx.trainer.n_params:,} encoder params, "
        f"{time.perf_counter() - t0:.1f}s"
    )
    return ctx


# ---------------------------------------------------------------------------------------- evaluation


def evaluate(ctx: FedContext, models: dict, split: str = "test") -> dict[str, float]:
    """Accuracy per (client, task) as ``"client/task"`` keys; a vector shared by several clients is evaluated once."""
    data = ctx.test if split == "test" else ctx.val
    seen: dict[tuple[int, str], float] = {}
    out = {}
    for (k, t), delta in models.items():
        key = (id(delta), t)
        if key not in seen:
            seen[key] = ctx.trainer.evaluate(delta, t, data[t], ctx.cfg.eval_batch_size)
        out[f"{k}/{t}"] = round(seen[key], 6)
    return out


def chance_levels(ctx: FedContext) -> dict[str, float]:
    """Chance accuracy per task, 1 / number of classes, read from the zero-shot heads (offline and real tasks)."""
    return {t: 1.0 / ctx.trainer.heads[t].shape[0] for t in ctx.tasks}


def _registry_chance(tasks: list[str]) -> dict[str, float]:
    """Chance per task from the task registries, for callers without a context (Flower strategy, ablations)."""
    from .data import REAL_TASKS, get_task

    out = {}
    for t in tasks:
        if t in REAL_TASKS and REAL_TASKS[t].classes is None:
            raise ValueError(f"chance level of {t} needs its class count: pass chance=chance_levels(ctx)")
        out[t] = 1.0 / len(REAL_TASKS[t].classes if t in REAL_TASKS else get_task(t).classes)
    return out


def summarise(
    per_pair: dict[str, float], reference: dict[str, float] | None, chance: dict[str, float] | None = None
) -> dict:
    """Per-task mean over the clients holding it, overall mean; normalised scores when ``reference`` is given.

    With a reference (individual accuracy per task) it adds ``stats.normalise``'s fields: ``normalised``
    (chance-corrected), ``ratio`` (acc / individual), their means without unlearnable tasks (``flagged``:
    individual within ``stats.CHANCE_MARGIN`` of chance, the one-seed rule) and with every task (``*_all``).
    ``chance`` defaults to 1 / classes from the task registry.
    """
    from .stats import normalise, unlearnable

    by_task: dict[str, list[float]] = {}
    for key, acc in per_pair.items():
        by_task.setdefault(key.split("/", 1)[1], []).append(acc)
    acc = {t: float(np.mean(v)) for t, v in sorted(by_task.items())}
    out = {"acc": acc, "mean_acc": float(np.mean(list(acc.values())))}
    if reference:
        missing = sorted(set(acc) - set(reference))
        if missing:
            raise ValueError(f"the normalisation reference has no accuracy for tasks {missing}")
        chance = chance if chance is not None else _registry_chance(list(acc))
        flagged = [t for t in acc if unlearnable([reference[t]], chance[t])]
        out |= normalise(acc, reference, chance, flagged)
    return out


NORMALISED_KEYS = (
    "normalised",
    "ratio",
    "flagged",
    "mean_normalised",
    "mean_normalised_all",
    "mean_ratio",
    "mean_ratio_all",
)


def round_entry(r: int, sampled: list[int], res: RoundResult, cum_up: int, cum_down: int, state_bytes: int) -> dict:
    """One round's history entry before evaluation (the runner and the Flower strategy build it here alone).

    ``info`` goes through JSON, so an entry equals what ``metrics.json`` holds whichever engine built it.
    """
    return {
        "round": r,
        "sampled": sampled,
        "bytes_up": res.bytes_up,
        "bytes_down": res.bytes_down,
        "cum_bytes_up": cum_up,
        "cum_bytes_down": cum_down,
        "server_state_bytes": state_bytes,
        "rejected": res.rejected,
        "info": json.loads(json.dumps(res.info)),
        "server_seconds": round(res.server_seconds, 4),
    }


def final_summary(history: list[dict], state_bytes: int, seconds_total: float) -> dict:
    """The ``final`` summary of a finished run from its history (runner and Flower strategy alike)."""
    last, rounds = history[-1], len(history)
    cum_up, cum_down = last["cum_bytes_up"], last["cum_bytes_down"]
    final = {k: last[k] for k in ("acc", "mean_acc", *NORMALISED_KEYS) if k in last}
    final |= {
        "rounds": rounds,
        "total_bytes_up": cum_up,
        "total_bytes_down": cum_down,
        "bytes_up_per_round": cum_up / rounds,
        "bytes_down_per_round": cum_down / rounds,
        "server_state_bytes": state_bytes,
        "seconds_total": round(seconds_total, 1),
        "rejected_uploads": sum(len(h["rejected"]) for h in history),
    }
    return final


def sample_clients(cfg: RunConfig, r: int) -> list[int]:
    m = max(1, round(cfg.participation * cfg.n_clients))
    rng = np.random.default_rng([cfg.seed, r, 7919])
    return sorted(int(k) for k in rng.choice(cfg.n_clients, size=m, replace=False))


# ------------------------------------------------------------------------------------------------ run


@dataclass
class RunResult:
    method: str
    history: list[dict]
    final: dict
    folder: Path | None


def run(
    ctx: FedContext,
    method: str,
    out: str | Path | None = None,
    reference: dict[str, float] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    stop_after: int | None = None,
    tamper: Callable | None = None,
    log: Callable[[str], None] = print,
) -> RunResult:
    """Run one method on ``ctx``; ``reference`` (individual fine-tuning accuracy per task) adds normalised scores.

    ``stop_after`` ends the call after that many rounds (as if killed) leaving a resumable checkpoint.
    A method with a grid (``Method.tuned_field``) and ``cfg.tune_baselines`` is refused here: tuning runs it
    several times on validation first, which is ``matu_lib.tuning.run_method``'s job.
    """
    if method not in METHODS:
        raise KeyError(f"unknown method '{method}'; choose from {sorted(METHODS)}")
    if ctx.cfg.tune_baselines and METHODS[method].tuned_field:
        raise ValueError(
            f"tune_baselines=True asks to tune {method} on validation first: run it with "
            f"matu_lib.tuning.run_method (compare and the command line do)"
        )
    cfg = ctx.cfg
    impl = METHODS[method](ctx)
    impl.tamper = tamper
    folder = Path(out) if out is not None else None
    if folder is None:
        return _run_rounds(ctx, impl, method, None, "", [], 1, reference, stop_after, log)
    config = folder_config(cfg, method)
    finished = prepare_folder(folder, config, resume, overwrite)  # takes the folder's writer lock
    try:
        if finished:
            saved = json.loads((folder / "metrics.json").read_text())
            log(f"{method}: reusing finished run in {folder}")
            return RunResult(method, saved["history"], saved["final"], folder)
        history, start = [], 1
        if (folder / "checkpoint" / CHECKPOINT_FILE).exists():
            history, done = load_checkpoint(folder, impl, config_id(config))
            start = done + 1
            log(f"{method}: resuming after round {done}")
        rewrite_metrics_jsonl(folder, history)
        return _run_rounds(ctx, impl, method, folder, config_id(config), history, start, reference, stop_after, log)
    finally:
        release_folder(folder)


def _run_rounds(
    ctx: FedContext,
    impl: Method,
    method: str,
    folder: Path | None,
    identity: str,
    history: list[dict],
    start: int,
    reference: dict[str, float] | None,
    stop_after: int | None,
    log: Callable[[str], None],
) -> RunResult:
    """Rounds ``start``.. of ``run``, checkpointed into ``folder`` (whose writer lock the caller holds)."""
    cfg = ctx.cfg
    rounds = cfg.rounds if impl.iterative else 1
    chance = chance_levels(ctx) if reference else None
    t_run = time.perf_counter()
    cum_up = history[-1]["cum_bytes_up"] if history else 0
    cum_down = history[-1]["cum_bytes_down"] if history else 0
    for r in range(start, rounds + 1):
        t0 = time.perf_counter()
        sampled = sample_clients(cfg, r)
        res = impl.run_round(r, sampled)
        cum_up += res.bytes_up.get("total", 0)
        cum_down += res.bytes_down.get("total", 0)
        entry = round_entry(r, sampled, res, cum_up, cum_down, impl.server_state_nbytes())
        if r % cfg.eval_every == 0 or r == rounds:
            per_pair = evaluate(ctx, impl.models(), cfg.eval_split)
            entry |= {"acc_clients": per_pair, **summarise(per_pair, reference, chance)}
        entry["seconds"] = round(time.perf_counter() - t0, 2)
        history.append(entry)
        msg = f"{method} round {r}/{rounds}: {entry['seconds']:.1f}s, up {res.bytes_up.get('total', 0):,} B"
        if "mean_acc" in entry:
            msg += f", mean acc {entry['mean_acc']:.3f}"
        log(msg)
        if folder is not None:
            kill_point("metrics.jsonl")
            with open(folder / "metrics.jsonl", "a") as f:
                f.write(json.dumps(entry) + "\n")
            kill_point("checkpoint")
            save_checkpoint(folder, impl, history, r, identity)
        if stop_after is not None and r >= stop_after and r < rounds:
            return RunResult(method, history, {}, folder)
    final = final_summary(history, impl.server_state_nbytes(), time.perf_counter() - t_run)
    if folder is not None:
        kill_point("metrics.json")
        atomic_write(
            folder / "metrics.json",
            json.dumps({"method": method, "config_id": identity, "history": history, "final": final}, indent=1),
        )
    return RunResult(method, history, final, folder)
