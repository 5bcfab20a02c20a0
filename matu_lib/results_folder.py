"""Results folders of runs: bound to one config, written by one process at a time, checkpointed for exact resume.

Results folder of one run: ``config.json``, ``metrics.jsonl`` (one line per evaluated round),
``metrics.json`` (history + final summary), ``checkpoint/`` (state after the last finished round).
A folder is never silently overwritten: an existing one is resumed (same config) or refused. It is bound to
its config (the checkpoint and ``metrics.json`` carry ``config_id``, and a file of another config is refused),
and one process writes it at a time (``.lock``, an OS file lock that ends with its process).
The method's state is saved after every round: one safetensors file holding state, progress and a content
hash, committed by one rename and verified on resume; ``metrics.jsonl`` is rewritten from it on resume.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .methods import Method
from .presets import MATU_ONLY_FIELDS, RunConfig


class CheckpointError(RuntimeError):
    """A checkpoint (or results folder) that cannot be trusted; the message says what to do."""


class FolderBusy(CheckpointError):
    """Another live process holds the results folder's writer lock; the message names its pid."""


class DiskFull(OSError):
    """A results file that did not fit on its disk; the message names it, the space it needs and what is kept."""


def disk_full(err: BaseException, path: Path, needed: int, kept: str) -> DiskFull | None:
    """A ``DiskFull`` line for ``err`` when it means the disk is full (an ``OSError`` ENOSPC, or safetensors'
    error wrapping one), else None. ``kept`` says what the failed write left intact."""
    if not (getattr(err, "errno", None) == errno.ENOSPC or "code: 28" in str(err) or "No space left" in str(err)):
        return None
    try:
        free = f"{shutil.disk_usage(path.parent).free / 2**20:,.1f} MiB"
    except OSError:
        free = "an unknown amount"
    return DiskFull(
        f"disk full: {path} needs about {needed / 2**20:,.1f} MiB and {path.parent} has {free} free; {kept}; "
        f"free some space (or choose another --out) and rerun the same command"
    )


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


def lock_folder(folder: Path) -> None:
    """Hold ``folder``'s writer lock (an OS file lock, released when this process ends however it ends) until
    ``release_folder``. A second writer, in another process, is refused with one line naming the holder, so two
    processes never write one folder and ``--overwrite`` never moves a folder that a live process is writing.
    Re-entrant within one process (a Flower server thread and its caller share the folder)."""
    key = folder.resolve()
    if key in _HELD:
        _HELD[key][1] += 1
        return
    try:
        fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise PermissionError(
            f"cannot write to results folder {folder} ({err.strerror}); choose another --out"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _lock_pid(fd)
        os.close(fd)
        raise FolderBusy(
            f"{folder} is being written by process {holder if holder is not None else '(unknown pid)'}; "
            f"wait for it to end (or stop it), or choose another --out"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _HELD[key] = [fd, 1]


def release_folder(folder: Path, all_levels: bool = False) -> None:
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


def kill_point(name: str) -> None:
    """A named point just before a write, where ``CHECKPOINT_HOOK`` (tests) can interrupt as a kill would."""
    if CHECKPOINT_HOOK is not None:
        CHECKPOINT_HOOK(name)


def atomic_write(path: Path, text: str) -> None:
    """Write a temp file beside ``path``, flush it to disk, then rename: readers see old or new, never half."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise disk_full(err, path, len(text.encode()), "the file as it was is kept") or err from None
    os.replace(tmp, path)


def _content_hash(state: dict[str, torch.Tensor], progress: str) -> str:
    """sha256 over the progress JSON and every tensor's name, dtype, shape and bytes (sorted by name)."""
    h = hashlib.sha256(progress.encode())
    for name in sorted(state):
        t = state[name].contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_checkpoint(folder: Path, method: Method, history: list[dict], done: int, config: str) -> None:
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
    try:
        save_file(
            state or {"_empty": torch.zeros(0)},
            str(tmp),
            metadata={"progress": progress, "sha256": _content_hash(state, progress)},
        )
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    except Exception as err:  # noqa: BLE001 - safetensors reports a full disk as its own error type
        tmp.unlink(missing_ok=True)
        needed = sum(t.numel() * t.element_size() for t in state.values()) + len(progress.encode())
        kept = f"{ck / CHECKPOINT_FILE} still holds round {done - 1}" if done > 1 else "no round is checkpointed yet"
        raise disk_full(err, ck / CHECKPOINT_FILE, needed, kept) or err from None
    kill_point("commit")
    os.replace(tmp, ck / CHECKPOINT_FILE)


def checkpoint_rounds(folder: Path) -> int | None:
    """Rounds done by the checkpoint in ``folder`` as its metadata says (unverified), or None without one."""
    from safetensors import safe_open

    try:
        with safe_open(str(folder / "checkpoint" / CHECKPOINT_FILE), framework="pt") as f:
            return int(json.loads((f.metadata() or {})["progress"])["rounds_done"])
    except Exception:  # noqa: BLE001 - missing or unreadable: no round to resume from
        return None


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
            raise CheckpointError(
                f"checkpoint {path} belongs to another config ({info['config_id']}; this run is {config}); {fix}"
            )
    except CheckpointError:
        raise
    except Exception as err:  # noqa: BLE001 - whatever is wrong with the file, the answer is the same
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(err).__name__}); {fix}") from None
    try:
        method.load_state_dict(state)
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(
            f"checkpoint {path} does not fit method '{method.name}' ({type(err).__name__}: {err}); {fix}"
        ) from None
    return history, done


def prepare_folder(out: Path, config: dict, resume: bool, overwrite: bool) -> bool:
    """Create or check the results folder and take its writer lock; returns True when a finished run of this
    config is already there (its ``metrics.json`` complete and carrying the config's identity).

    Everything that can refuse the folder is checked here, before any work: a file in its place, a live writer,
    another config, a corrupt ``config.json``, an older checkpoint format, a folder that cannot be written, an
    incomplete or foreign ``metrics.json``. The lock is held until ``run`` ends (``release_folder``), or, for a
    caller that never releases it, until the process ends.
    """
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} is a file, not a results folder; choose another --out")
    if out.is_dir():
        lock_folder(out)  # before anything is judged: a folder a live process writes is neither reused nor moved
    try:
        return _prepare_locked(out, config, resume, overwrite)
    except BaseException:
        release_folder(out)
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
            release_folder(out, all_levels=True)  # that lock moved away with the old folder
        elif old is None:
            raise CheckpointError(
                f"{cfg_file} is missing or corrupt; rerun with --overwrite (overwrite=True) to move {out} aside"
            )
        elif not same_run(old, config):
            raise FileExistsError(
                f"{out} holds a run with a different config; choose another folder or pass "
                f"overwrite=True (the old results are moved to a .bak folder)"
            )
        elif not resume:
            raise FileExistsError(f"{out} already holds this run; pass resume=True to continue or reuse it")
        else:
            if (out / "checkpoint" / "progress.json").exists() and not (out / "checkpoint" / CHECKPOINT_FILE).exists():
                raise CheckpointError(
                    f"{out}/checkpoint is in an older, non-atomic format; rerun with --overwrite "
                    f"(overwrite=True) to move {out} aside"
                )
            _check_writable(out)
            if not (out / "metrics.json").exists():
                return False
            _check_finished(out, config)
            return True
    elif out.exists() and any(p.name not in (LOCK_FILE, ".write-probe") for p in out.iterdir()):
        raise FileExistsError(f"{out} exists and is not a results folder; refusing to write into it")
    out.mkdir(parents=True, exist_ok=True)
    lock_folder(out)
    _check_writable(out)
    atomic_write(cfg_file, json.dumps(config, indent=2))
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
        raise CheckpointError(
            f"{path} was written by another config ({saved['config_id']}; this folder's config is "
            f"{config_id(config)}); rerun with --overwrite (overwrite=True) to move {out} aside"
        )
    complete = (
        isinstance(history, list)
        and history
        and all(isinstance(h, dict) for h in history)
        and isinstance(final, dict)
        and all(k in final for k in FINAL_KEYS)
        and final["rounds"] == len(history)
    )
    if not complete:
        raise CheckpointError(
            f"{path} is incomplete (needs a non-empty history and a final summary with "
            f"{list(FINAL_KEYS)} over as many rounds); {fix}"
        )


def _check_writable(out: Path) -> None:
    """Fail before the first round, not after it, when results cannot be written."""
    probe = out / ".write-probe"
    try:
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise PermissionError(f"cannot write to results folder {out} ({err.strerror}); choose another --out") from None


def rewrite_metrics_jsonl(folder: Path, history: list[dict]) -> None:
    """``metrics.jsonl`` is derived from the checkpoint's history: rewritten on resume, so a round logged
    before a kill but never checkpointed is dropped, and no round appears twice."""
    atomic_write(folder / "metrics.jsonl", "".join(json.dumps(entry) + "\n" for entry in history))


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
    prefix = "-".join(
        f"{k}={'x'.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in sorted(overrides.items())
    )
    return out / f"{prefix or 'default'}-{stamp}".replace(" ", "")
