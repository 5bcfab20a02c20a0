"""The in-process federation runner: rounds, evaluation, metrics, results folders, checkpoint and resume.

    ctx = build_context(preset("cpu"))
    result = run(ctx, "matu", out="results/cpu/matu")
    table = compare(ctx, ["individual", "matu", "fedavg"], out="results/cpu")
    summary = compare_seeds(preset("cpu"), [0, 1, 2], out="results/cpu")  # seed0/ seed1/ seed2/ summary.md

Results folder of one run: ``config.json``, ``metrics.jsonl`` (one line per evaluated round),
``metrics.json`` (history + final summary), ``checkpoint/`` (state after the last finished round).
A folder is never silently overwritten: an existing one is resumed (same config) or refused. It is bound to
its config (the checkpoint and ``metrics.json`` carry ``config_id``, and a file of another config is refused),
and one process writes it at a time (``.lock``, an OS file lock that ends with its process).
Resume is exact: every random choice derives its seed from (run seed, round, client, task), and the
method's state is saved after every round: one safetensors file holding state, progress and a content
hash, committed by one rename and verified on resume; ``metrics.jsonl`` is rewritten from it on resume.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .backbones import load_backbone
from .client import Client
from .methods import METHODS, FedContext, Method, RoundResult
from .presets import MATU_ONLY_FIELDS, RunConfig, check_runnable, partition_for
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
            keep = torch.randperm(len(x), generator=torch.Generator().manual_seed(cfg.seed))[:cfg.max_train_per_task]
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
    ft = FinetuneConfig(steps=cfg.local_steps, batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=cfg.weight_decay,
                        warmup_steps=cfg.warmup_steps, grad_clip=cfg.grad_clip)
    sizes = {t: len(train[t][0]) if isinstance(train[t], tuple) else len(train[t]) for t in train}
    manifest = partition_for(cfg, sizes, labels)
    clients = []
    for k in range(cfg.n_clients):
        shards = {}
        for t in manifest.tasks_of(k):
            idx = torch.tensor(manifest.indices(k, t), dtype=torch.long)
            shards[t] = ((train[t][0][idx], train[t][1][idx]) if isinstance(train[t], tuple)
                         else torch.utils.data.Subset(train[t], idx.tolist()))
        clients.append(Client(k, shards))
    ctx = FedContext(cfg, LocalTrainer(backbone, heads, ft), clients, train, val, test)
    ctx.cache["manifest"] = manifest
    log(f"context: {len(train)} tasks, {cfg.n_clients} clients, {ctx.trainer.n_params:,} encoder params, "
        f"{time.perf_counter() - t0:.1f}s")
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


def summarise(per_pair: dict[str, float], reference: dict[str, float] | None,
              chance: dict[str, float] | None = None) -> dict:
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


NORMALISED_KEYS = ("normalised", "ratio", "flagged", "mean_normalised", "mean_normalised_all", "mean_ratio",
                   "mean_ratio_all")


def round_entry(r: int, sampled: list[int], res: RoundResult, cum_up: int, cum_down: int, state_bytes: int) -> dict:
    """One round's history entry before evaluation (the runner and the Flower strategy build it here alone).

    ``info`` goes through JSON, so an entry equals what ``metrics.json`` holds whichever engine built it.
    """
    return {"round": r, "sampled": sampled, "bytes_up": res.bytes_up, "bytes_down": res.bytes_down,
            "cum_bytes_up": cum_up, "cum_bytes_down": cum_down, "server_state_bytes": state_bytes,
            "rejected": res.rejected, "info": json.loads(json.dumps(res.info)),
            "server_seconds": round(res.server_seconds, 4)}


def final_summary(history: list[dict], state_bytes: int, seconds_total: float) -> dict:
    """The ``final`` summary of a finished run from its history (runner and Flower strategy alike)."""
    last, rounds = history[-1], len(history)
    cum_up, cum_down = last["cum_bytes_up"], last["cum_bytes_down"]
    final = {k: last[k] for k in ("acc", "mean_acc", *NORMALISED_KEYS) if k in last}
    final |= {"rounds": rounds, "total_bytes_up": cum_up, "total_bytes_down": cum_down,
              "bytes_up_per_round": cum_up / rounds, "bytes_down_per_round": cum_down / rounds,
              "server_state_bytes": state_bytes, "seconds_total": round(seconds_total, 1),
              "rejected_uploads": sum(len(h["rejected"]) for h in history)}
    return final


def sample_clients(cfg: RunConfig, r: int) -> list[int]:
    m = max(1, round(cfg.participation * cfg.n_clients))
    rng = np.random.default_rng([cfg.seed, r, 7919])
    return sorted(int(k) for k in rng.choice(cfg.n_clients, size=m, replace=False))


# ------------------------------------------------------------------------------------ results folder


class CheckpointError(RuntimeError):
    """A checkpoint (or results folder) that cannot be trusted; the message says what to do."""


class FolderBusy(CheckpointError):
    """Another live process holds the results folder's writer lock; the message names its pid."""


# Fault injection for tests: called with the name of each checkpointing step just before it happens
# ("metrics.jsonl", "checkpoint", "commit", "metrics.json"); a test raises there to simulate a kill.
CHECKPOINT_HOOK: Callable[[str], None] | None = None

CHECKPOINT_FILE = "checkpoint.safetensors"  # state + progress + content hash, committed by one rename


LOCK_FILE = ".lock"  # flock'ed while a process writes the folder; holds the writer's pid; the lock dies with it
_HELD: dict[Path, list] = {}  # folder (resolved) -> [fd of its lock file, depth]: the locks this process holds


def folder_holder(folder: Path) -> int | None:
    """The pid of the live process that holds ``folder``'s writer lock, or None when no other process holds it."""
    path = Path(folder) / LOCK_FILE
    if Path(folder).resolve() in _HELD or not path.exists():
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        return _lock_pid(fd)
    finally:
        os.close(fd)  # closing drops the probe's shared lock, if it got one


def _lock_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _lock_folder(folder: Path) -> None:
    """Hold ``folder``'s writer lock (an OS file lock, released when this process ends however it ends) until
    ``_release_folder``. A second writer, in another process, is refused with one line naming the holder, so two
    processes never write one folder and ``--overwrite`` never moves a folder that a live process is writing.
    Re-entrant within one process (a Flower server thread and its caller share the folder)."""
    key = folder.resolve()
    if key in _HELD:
        _HELD[key][1] += 1
        return
    try:
        fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise PermissionError(f"cannot write to results folder {folder} ({err.strerror}); choose another --out") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _lock_pid(fd)
        os.close(fd)
        raise FolderBusy(f"{folder} is being written by process {holder if holder is not None else '(unknown pid)'}; "
                         f"wait for it to end (or stop it), or choose another --out") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _HELD[key] = [fd, 1]


def _release_folder(folder: Path, all_levels: bool = False) -> None:
    """Give back one level of ``folder``'s writer lock (every level with ``all_levels``); the file stays."""
    key = folder.resolve()
    if key not in _HELD:
        return
    _HELD[key][1] -= 1
    if all_levels or _HELD[key][1] <= 0:
        os.close(_HELD.pop(key)[0])


def config_id(config: dict) -> str:
    """The identity of a ``folder_config``: sha256 of its canonical JSON, without the fields ``same_run`` leaves
    out for the method. The checkpoint and ``metrics.json`` carry it, so a file from another config is refused."""
    if config.get("method") != "matu":
        config = {k: v for k, v in config.items() if k not in MATU_ONLY_FIELDS}
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def _step(name: str) -> None:
    if CHECKPOINT_HOOK is not None:
        CHECKPOINT_HOOK(name)


def _atomic_write(path: Path, text: str) -> None:
    """Write a temp file beside ``path``, flush it to disk, then rename: readers see old or new, never half."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _content_hash(state: dict[str, torch.Tensor], progress: str) -> str:
    """sha256 over the progress JSON and every tensor's name, dtype, shape and bytes (sorted by name)."""
    h = hashlib.sha256(progress.encode())
    for name in sorted(state):
        t = state[name].contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _save_checkpoint(folder: Path, method: Method, history: list[dict], done: int, config: str) -> None:
    """One file holds the method's state, the progress (rounds done, history, ``config_id``) and their content
    hash; it is written beside the old one and committed by a single ``os.replace``, so a kill at any point leaves
    either the previous round's checkpoint or this one, never a mix of the two."""
    from safetensors.torch import save_file

    ck = folder / "checkpoint"
    ck.mkdir(parents=True, exist_ok=True)
    # clone: methods may share one tensor between keys (grouped clients), which safetensors refuses
    state = {k: v.detach().cpu().clone().contiguous() for k, v in method.state_dict().items()}
    progress = json.dumps({"rounds_done": done, "history": history, "config_id": config})
    tmp = ck / (CHECKPOINT_FILE + ".tmp")
    save_file(state or {"_empty": torch.zeros(0)}, str(tmp),
              metadata={"progress": progress, "sha256": _content_hash(state, progress)})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    _step("commit")
    os.replace(tmp, ck / CHECKPOINT_FILE)


def load_checkpoint(folder: Path, method: Method, config: str) -> tuple[list[dict], int]:
    """(history, rounds done) from the checkpoint after verifying its content hash and that it belongs to the
    config whose ``config_id`` is ``config`` (a checkpoint written before it carried one is trusted to the folder's
    ``config.json``); the method's state is loaded only from such a checkpoint. Anything else raises one
    ``CheckpointError`` line."""
    from safetensors import safe_open

    path = folder / "checkpoint" / CHECKPOINT_FILE
    fix = f"rerun with --overwrite (overwrite=True) to move {folder} aside and start again"
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
        state.pop("_empty", None)
        progress = meta["progress"]
        if _content_hash(state, progress) != meta.get("sha256"):
            raise CheckpointError(f"checkpoint {path} fails its content check (corrupted); {fix}")
        info = json.loads(progress)
        history, done = info["history"], int(info["rounds_done"])
        if info.get("config_id", config) != config:
            raise CheckpointError(f"checkpoint {path} belongs to another config ({info['config_id']}; this run is "
                                  f"{config}); {fix}")
    except CheckpointError:
        raise
    except Exception as err:  # noqa: BLE001 - whatever is wrong with the file, the answer is the same
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(err).__name__}); {fix}") from None
    try:
        method.load_state_dict(state)
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(f"checkpoint {path} does not fit method '{method.name}' ({type(err).__name__}: "
                              f"{err}); {fix}") from None
    return history, done


def _prepare_folder(out: Path, config: dict, resume: bool, overwrite: bool) -> bool:
    """Create or check the results folder and take its writer lock; returns True when a finished run of this
    config is already there (its ``metrics.json`` complete and carrying the config's identity).

    Everything that can refuse the folder is checked here, before any work: a file in its place, a live writer,
    another config, a corrupt ``config.json``, an older checkpoint format, a folder that cannot be written, an
    incomplete or foreign ``metrics.json``. The lock is held until ``run`` ends (``_release_folder``), or, for a
    caller that never releases it, until the process ends.
    """
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} is a file, not a results folder; choose another --out")
    if out.is_dir():
        _lock_folder(out)  # before anything is judged: a folder a live process writes is neither reused nor moved
    try:
        return _prepare_locked(out, config, resume, overwrite)
    except BaseException:
        _release_folder(out)
        raise


def _prepare_locked(out: Path, config: dict, resume: bool, overwrite: bool) -> bool:
    cfg_file = out / "config.json"
    if cfg_file.exists() or (out / "metrics.json").exists():
        try:
            old = json.loads(cfg_file.read_text())
        except (OSError, ValueError):
            old = None
        if overwrite:
            backup = out.with_name(out.name + time.strftime(".%Y%m%d-%H%M%S.bak"))
            shutil.move(str(out), backup)  # never delete results: keep them beside the new run
            _release_folder(out, all_levels=True)  # that lock moved away with the old folder
        elif old is None:
            raise CheckpointError(f"{cfg_file} is missing or corrupt; rerun with --overwrite (overwrite=True) to "
                                  f"move {out} aside")
        elif not same_run(old, config):
            raise FileExistsError(f"{out} holds a run with a different config; choose another folder or pass "
                                  f"overwrite=True (the old results are moved to a .bak folder)")
        elif not resume:
            raise FileExistsError(f"{out} already holds this run; pass resume=True to continue or reuse it")
        else:
            if (out / "checkpoint" / "progress.json").exists() and not (out / "checkpoint" / CHECKPOINT_FILE).exists():
                raise CheckpointError(f"{out}/checkpoint is in an older, non-atomic format; rerun with --overwrite "
                                      f"(overwrite=True) to move {out} aside")
            _check_writable(out)
            if not (out / "metrics.json").exists():
                return False
            _check_finished(out, config)
            return True
    elif out.exists() and any(p.name not in (LOCK_FILE, ".write-probe") for p in out.iterdir()):
        raise FileExistsError(f"{out} exists and is not a results folder; refusing to write into it")
    out.mkdir(parents=True, exist_ok=True)
    _lock_folder(out)
    _check_writable(out)
    _atomic_write(cfg_file, json.dumps(config, indent=2))
    return False


FINAL_KEYS = ("acc", "mean_acc", "rounds")  # what every finished run's summary holds (final_summary)


def _check_finished(out: Path, config: dict) -> None:
    """A finished run is reused only whole and only for its own config: ``metrics.json`` must be JSON with this
    method, a non-empty history, a final summary of as many rounds, and (when it carries one, as every file
    ``run`` writes does) this config's ``config_id``. Anything else is one ``CheckpointError`` line."""
    path = out / "metrics.json"
    fix = "delete it to recompute the summary from the checkpoint, or rerun with --overwrite (overwrite=True)"
    try:
        saved = json.loads(path.read_text())
        history, final = saved["history"], saved["final"]
    except (OSError, ValueError, KeyError, TypeError):
        raise CheckpointError(f"{path} is corrupt; {fix}") from None
    if saved.get("method", config.get("method")) != config.get("method"):
        raise CheckpointError(f"{path} holds method {saved['method']!r}, not {config.get('method')!r}; {fix}")
    if "config_id" in saved and saved["config_id"] != config_id(config):
        raise CheckpointError(f"{path} was written by another config ({saved['config_id']}; this folder's config is "
                              f"{config_id(config)}); rerun with --overwrite (overwrite=True) to move {out} aside")
    complete = (isinstance(history, list) and history and all(isinstance(h, dict) for h in history)
                and isinstance(final, dict) and all(k in final for k in FINAL_KEYS)
                and final["rounds"] == len(history))
    if not complete:
        raise CheckpointError(f"{path} is incomplete (needs a non-empty history and a final summary with "
                              f"{list(FINAL_KEYS)} over as many rounds); {fix}")


def _check_writable(out: Path) -> None:
    """Fail before the first round, not after it, when results cannot be written."""
    probe = out / ".write-probe"
    try:
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise PermissionError(f"cannot write to results folder {out} ({err.strerror}); choose another --out") from None


def _rewrite_metrics_jsonl(folder: Path, history: list[dict]) -> None:
    """``metrics.jsonl`` is derived from the checkpoint's history: rewritten on resume, so a round logged
    before a kill but never checkpointed is dropped, and no round appears twice."""
    _atomic_write(folder / "metrics.jsonl", "".join(json.dumps(entry) + "\n" for entry in history))


def folder_config(cfg: RunConfig, method: str) -> dict:
    """What a results folder's ``config.json`` holds (and is compared with on reuse): the method and the
    config's identity, as JSON reads it back (tuples become lists). Every engine (in-process, Flower) writes this."""
    return json.loads(json.dumps({"method": method, **cfg.identity(method)}))


def same_run(saved: dict, config: dict) -> bool:
    """Whether a folder's saved ``config.json`` names the run ``config`` (a ``folder_config``) describes.

    For every method but MaTU the fields only MaTU reads (``presets.MATU_ONLY_FIELDS``) are left out of the
    comparison: a baseline saved while one of them had another default is the same baseline run."""
    if config.get("method") != "matu":
        saved, config = ({k: v for k, v in c.items() if k not in MATU_ONLY_FIELDS} for c in (saved, config))
    return saved == config


def run_folder(cfg: RunConfig, overrides: dict, out: Path) -> Path:
    """One folder per distinct config: readable prefix from the overrides, hash of the full config."""
    stamp = hashlib.sha1(json.dumps(cfg.identity(), sort_keys=True).encode()).hexdigest()[:8]
    prefix = "-".join(f"{k}={'x'.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in sorted(overrides.items()))
    return out / f"{prefix or 'default'}-{stamp}".replace(" ", "")


# ------------------------------------------------------------------------------------------------ run


@dataclass
class RunResult:
    method: str
    history: list[dict]
    final: dict
    folder: Path | None


def run(ctx: FedContext, method: str, out: str | Path | None = None, reference: dict[str, float] | None = None,
        resume: bool = False, overwrite: bool = False, stop_after: int | None = None,
        tamper: Callable | None = None, log: Callable[[str], None] = print) -> RunResult:
    """Run one method on ``ctx``; ``reference`` (individual fine-tuning accuracy per task) adds normalised scores.

    ``stop_after`` ends the call after that many rounds (as if killed) leaving a resumable checkpoint.
    With ``cfg.tune_baselines`` a method with a grid (``Method.tuned_field``) is first tuned on validation
    (``matu_lib.tuning.run_tuned``); the selection is recorded in ``final["tuning"]``.
    """
    if method not in METHODS:
        raise KeyError(f"unknown method '{method}'; choose from {sorted(METHODS)}")
    if ctx.cfg.tune_baselines and METHODS[method].tuned_field:  # opt-in: baseline's grid on validation first
        from .tuning import run_tuned

        return run_tuned(ctx, method, out, reference=reference, resume=resume, overwrite=overwrite,
                         stop_after=stop_after, tamper=tamper, log=log)
    cfg = ctx.cfg
    impl = METHODS[method](ctx)
    impl.tamper = tamper
    folder = Path(out) if out is not None else None
    if folder is None:
        return _run_rounds(ctx, impl, method, None, "", [], 1, reference, stop_after, log)
    config = folder_config(cfg, method)
    finished = _prepare_folder(folder, config, resume, overwrite)  # takes the folder's writer lock
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
        _rewrite_metrics_jsonl(folder, history)
        return _run_rounds(ctx, impl, method, folder, config_id(config), history, start, reference, stop_after, log)
    finally:
        _release_folder(folder)


def _run_rounds(ctx: FedContext, impl: Method, method: str, folder: Path | None, identity: str, history: list[dict],
                start: int, reference: dict[str, float] | None, stop_after: int | None,
                log: Callable[[str], None]) -> RunResult:
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
            _step("metrics.jsonl")
            with open(folder / "metrics.jsonl", "a") as f:
                f.write(json.dumps(entry) + "\n")
            _step("checkpoint")
            _save_checkpoint(folder, impl, history, r, identity)
        if stop_after is not None and r >= stop_after and r < rounds:
            return RunResult(method, history, {}, folder)
    final = final_summary(history, impl.server_state_nbytes(), time.perf_counter() - t_run)
    if folder is not None:
        _step("metrics.json")
        _atomic_write(folder / "metrics.json", json.dumps({"method": method, "config_id": identity, "history": history,
                                                           "final": final}, indent=1))
    return RunResult(method, history, final, folder)


# ``individual_converged`` (up to 15 times ``individual``'s training) is opt-in: ``--methods`` names it.
DEFAULT_COMPARISON = ("zero_shot", "individual", "local", "matu", "fedavg", "fedprox", "per_task_fedavg",
                      "matfl_grouping", "task_arithmetic", "ties", "tall_masks", "consensus", "emr")


def compare(ctx: FedContext, methods: tuple[str, ...] | list[str] = DEFAULT_COMPARISON, out: str | Path | None = None,
            resume: bool = True, overwrite: bool = False, log: Callable[[str], None] = print) -> list[dict]:
    """Run several methods on the same context; ``individual`` runs first and is the normalisation reference."""
    methods = list(methods)
    if "individual" not in methods:
        methods.insert(0, "individual")
    methods.sort(key=lambda m: m != "individual")
    rows, reference, chance = [], None, chance_levels(ctx)
    for name in methods:
        res = run(ctx, name, Path(out) / name if out else None, reference=reference, resume=resume,
                  overwrite=overwrite, log=log)
        if name == "individual":
            reference = res.final["acc"]
        if reference is not None:  # also for finished runs reused from a folder written without a reference
            per_task = summarise({f"0/{t}": a for t, a in res.final["acc"].items()}, reference, chance)
            res.final |= {k: per_task[k] for k in NORMALISED_KEYS}
        per_task_keys = ("acc", "normalised", "ratio")
        rows.append({"method": name, **{k: v for k, v in res.final.items() if k not in per_task_keys},
                     **{k: res.final.get(k) for k in per_task_keys}, "chance": chance})
    if out is not None:
        _atomic_write(Path(out) / "summary.json", json.dumps(rows, indent=1))
        _atomic_write(Path(out) / "table.md", format_table(rows))
    return rows


def format_table(rows: list[dict]) -> str:
    """A Markdown table of one seed: absolute mean accuracy, normalised (chance-corrected) and ratio, bytes, time."""
    head = ("| method | mean acc (abs) | mean normalised | mean ratio | upload/round | download/round | server state "
            "| time |\n|---|---|---|---|---|---|---|---|\n")
    nan = float("nan")
    lines = [f"| {r['method']} | {r['mean_acc']:.3f} | {r.get('mean_normalised', nan):.3f} | "
             f"{r.get('mean_ratio', nan):.3f} | {_mb(r['bytes_up_per_round'])} | {_mb(r['bytes_down_per_round'])} | "
             f"{_mb(r['server_state_bytes'])} | {r['seconds_total']:.0f}s |" for r in rows]
    return head + "\n".join(lines) + "\n"


def _mb(x: float) -> str:
    return f"{x / 1e6:.2f} MB"


# ----------------------------------------------------------------------------------- over seeds


def seed_folder(out: str | Path, seed: int) -> Path:
    """Where one seed's comparison lives under a multi-seed results folder (runs of two seeds never collide)."""
    return Path(out) / f"seed{seed}"


def compare_seeds(cfg: RunConfig, seeds: list[int] | tuple[int, ...], methods: tuple[str, ...] | list[str] =
                  DEFAULT_COMPARISON, out: str | Path | None = None, resume: bool = True, overwrite: bool = False,
                  n_boot: int = 10_000, scheme: str = "crossed", log: Callable[[str], None] = print,
                  folders: Callable[[RunConfig], Path] | None = None) -> dict:
    """``compare`` once per seed (into ``out/seed<s>``, each resumable), then ``stats.aggregate_seeds``.

    ``folders`` maps a seed's config to its comparison folder instead (the notebooks use ``run_folder``, so
    the seed that notebooks 02 and 06 read is the same run, not a second copy).

    Writes ``out/summary.json`` and ``out/summary.md`` (``format_seed_summary``); returns the summary, with
    ``sentences`` (``stats.losses_in_words``) and ``config`` (the run config without its seed) added.
    """
    from dataclasses import replace

    from .costs import add_costs
    from .stats import aggregate_seeds, losses_in_words

    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct and at least one, got {seeds}")
    rows_by_seed, seed_folders = {}, {}
    for s in seeds:
        seed_cfg = replace(cfg, seed=s)
        folder = folders(seed_cfg) if folders is not None else seed_folder(out, s) if out is not None else None
        seed_folders[s] = folder
        rows_by_seed[s] = compare(build_context(seed_cfg, log=log), methods, folder, resume=resume,
                                  overwrite=overwrite, log=log)
    summary = aggregate_seeds(rows_by_seed, rows_by_seed[seeds[0]][0]["chance"], n_boot=n_boot, scheme=scheme)
    summary["sentences"] = losses_in_words(summary)
    summary["config"] = {k: v for k, v in json.loads(json.dumps(cfg.to_dict())).items() if k != "seed"}
    if all(f is not None for f in seed_folders.values()):  # bytes, rounds and compute over the run (matu_lib.costs)
        add_costs(summary, seed_folders)
    if out is not None:
        write_summary(summary, Path(out) / "summary.md")
    return summary


def write_summary(summary: dict, path: str | Path, command: str | None = None) -> tuple[Path, Path]:
    """Write ``format_seed_summary`` to ``path`` (.md) and the numbers beside it (.json, NaN as null)."""
    return write_results(path, format_seed_summary(summary, command), summary | {"command": command})


def write_results(path: str | Path, text: str, numbers: dict) -> tuple[Path, Path]:
    """A results file: ``text`` to ``path`` (.md) and ``numbers`` beside it as strict JSON (NaN as null), each
    written whole or not at all, so a killed command never leaves half a committed results file."""
    path = Path(path)
    if path.suffix != ".md":
        raise ValueError(f"the results path must end in .md (the JSON goes beside it), got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, text)
    _atomic_write(path.with_suffix(".json"), json.dumps(_json_safe(json.loads(json.dumps(numbers, default=float))),
                                                        indent=1))
    return path, path.with_suffix(".json")


def invocation(module: str, argv: Sequence[str] | None) -> str:
    """The command line a results file names as its maker (``argv`` None: this process's arguments)."""
    return f"python -m {module} " + " ".join(map(shlex.quote, sys.argv[1:] if argv is None else argv))


def publish(text: str, numbers: dict, path: Path | None) -> int:
    """A study command's ending: print its table, write it (``write_results``) when ``--results`` names a file."""
    print(text)
    if path is not None:
        write_results(path, text, numbers)
        print(f"results file: {path}")
    return 0


def _json_safe(obj):
    """NaN -> None and tuples -> lists, so the file is strict JSON that any reader accepts."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float) and obj != obj:
        return None
    return obj


def _pm(mean_sd: tuple[float, float] | list[float], digits: int = 3) -> str:
    mean, sd = mean_sd
    if mean != mean:
        return "-"
    return f"{mean:.{digits}f}" + ("" if sd != sd else f" ± {sd:.{digits}f}")


def format_seed_summary(summary: dict, command: str | None = None) -> str:
    """Markdown: headline table (mean ± sd, paired differences), sentences, flagged tasks, per-task tables.

    With one seed nothing speaks of a spread: no sd is shown, the flagging rule is stated without one, and the
    header says "mean over 1 seed (no spread)"."""
    from .costs import cost_section
    from .stats import _display, flag_rule, over_seeds

    seeds, target, ref = summary["seeds"], summary["target"], summary["reference"]
    cfg = summary.get("config", {})
    methods, diffs = summary["methods"], summary["differences"]
    any_diff = next(iter(diffs.values()), None)
    t_name = _display(target)
    lines = [f"# {t_name} against the baselines: `{cfg.get('preset', '?')}` preset, "
             f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}", ""]
    if command:
        lines += [f"Written by `{command}`.", ""]
    spread = over_seeds(len(seeds))
    lines += [f"{spread[0].upper()}{spread[1:]} ({cfg.get('eval_split', '?')} split, "
              f"{len(summary['tasks'])} tasks). **Normalised** = (acc - chance) / ({ref} - chance) per task, chance = "
              f"1 / classes, averaged over the learnable tasks; *all tasks* keeps the flagged ones; **ratio** = acc / "
              f"{ref} (the earlier measure), learnable tasks." + (
                  f" *vs converged*: normalised the same way against `{summary['converged_reference']}` (per-task "
                  "fine-tuning trained until validation accuracy stops improving)."
                  if summary.get("converged_reference") else ""), ""]
    conv = bool(summary.get("converged_reference"))
    head = ("| method | mean acc (abs) | mean normalised | normalised, all tasks | ratio | "
            + ("normalised vs converged | " if conv else "")
            + f"{t_name} - method, abs | {t_name} - method, normalised | upload/round | server state |")
    lines += [head, "|" + "---|" * (10 if conv else 9)]

    def diff_cell(m: str, key: str) -> str:
        if m not in diffs:
            return "-"
        d = diffs[m][key]
        return f"{d['mean']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]"

    for m, row in methods.items():
        name = f"**{m}**" if m == target else (f"{m} (reference)" if m == ref else m)
        up = _mb(row["bytes_up_per_round"]) if "bytes_up_per_round" in row else "-"
        state = _mb(row["server_state_bytes"]) if "server_state_bytes" in row else "-"
        lines.append(f"| {name} | {_pm(row['mean_acc'])} | {_pm(row['mean_normalised'])} | "
                     f"{_pm(row['mean_normalised_all'])} | {_pm(row['mean_ratio'])} | "
                     + (f"{_pm(row['mean_normalised_converged'])} | " if conv else "") + f"{diff_cell(m, 'acc')} | "
                     f"{diff_cell(m, 'normalised')} | {up} | {state} |")
    lines.append("")
    if any_diff is not None:
        a = any_diff["acc"]
        lines += [f"Differences are {t_name} - method, paired on (seed, task), averaged; brackets: "
                  f"{round(100 * a['level'])}% percentile bootstrap interval ({a['n_boot']} resamples, scheme "
                  + ("`crossed`: seeds and tasks resampled independently with replacement)." if len(seeds) > 1 else
                     "`crossed` with one seed: tasks resampled with replacement, so seed-to-seed variation is not "
                     "in the interval).")
                  if a["scheme"] == "crossed" else
                  f"Differences are {t_name} - method, paired on (seed, task); brackets: {round(100 * a['level'])}% "
                  f"bootstrap interval ({a['n_boot']} resamples, scheme `{a['scheme']}`).", ""]
    sentences = summary.get("sentences") or []
    if any_diff is not None:
        lines += ["In words:", ""] + ([f"- {s}" for s in sentences] or
                                      [f"- {t_name} is not beaten by any baseline on either measure (means over "
                                       f"{len(seeds)} seed{'s' if len(seeds) > 1 else ''})."]) + [""]
    chance, ref_acc = summary["chance"], methods[ref]["acc"]
    if summary["flagged"]:
        flagged = ", ".join(f"{t} (chance {chance[t]:.3f}, {ref} {_pm(ref_acc[t])})" for t in summary["flagged"])
        lines += [f"Flagged as not learned ({flag_rule(len(seeds), ref, summary['margin'])}), left out of "
                  f"the normalised and ratio means: {flagged}.", ""]
    else:
        lines += [f"No task flagged (the rule: {flag_rule(len(seeds), ref, summary['margin'])}).", ""]
    lines += cost_section(summary)  # "Cost over the run" (matu_lib.costs), when the summary has costs
    for key, title in (("acc", "absolute accuracy"), ("normalised", "normalised accuracy")):
        lines += [f"## Per task: {title} ({over_seeds(len(seeds))})", "",
                  "| task | chance | " + " | ".join(methods) + " |",
                  "|" + "---|" * (len(methods) + 2)]
        for t in summary["tasks"]:
            mark = " (flagged)" if t in summary["flagged"] else ""
            lines.append(f"| {t}{mark} | {chance[t]:.3f} | " +
                         " | ".join(_pm(methods[m][key][t], 2) for m in methods) + " |")
        lines.append("")
    return "\n".join(lines)
