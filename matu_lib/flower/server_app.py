"""The Flower ServerApp: ``MethodStrategy`` for ``cfg.rounds`` rounds of any iterative method.

Run config (``[tool.flwr.app.config]`` in ``flower_app/pyproject.toml``, or ``flwr run --run-config``):
``preset`` (e.g. "smoke"), ``method`` (an iterative method: "matu", "fedavg", "fedprox", "per_task_fedavg",
"matfl_grouping"), ``overrides`` (JSON object of RunConfig
overrides, e.g. '{"model": "matu-micro", "pretrained": null}') and ``out`` (results folder; "" for none).
``resume`` / ``overwrite`` ("true" | "false") follow ``federation.run``'s folder rules.
The results folder has the in-process format (``config.json``, ``metrics.jsonl``, ``metrics.json``) but
no ``checkpoint/``: resuming an unfinished Flower run starts it again at round 1.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from flwr.app import ArrayRecord, Context, Message
from flwr.serverapp import Grid, ServerApp

from ..federation import RunResult
from ..presets import RunConfig, preset
from ..results_folder import atomic_write, config_id, folder_config, prepare_folder, rewrite_metrics_jsonl
from .strategy import make_strategy, write_entry

app = ServerApp()


class RunStopped(RuntimeError):
    """The run's ``stop`` event was set (its caller was interrupted): the ServerApp ends at its next wait."""


class StoppableGrid(Grid):
    """``grid`` whose every wait ends within ``poll`` seconds once ``stop`` is set, by raising ``RunStopped``.

    Flower runs the ServerApp in a non-daemon thread that nothing stops: when the caller is interrupted, a
    strategy waiting in ``send_and_receive`` (for up to its one-hour timeout) would keep the process alive
    after the clean-up. This wrapper polls replies itself, checking ``stop`` between polls.
    """

    def __init__(self, grid: Grid, stop: threading.Event, poll: float = 0.1) -> None:
        self.grid, self.stop, self.poll = grid, stop, poll

    def __getattr__(self, name: str) -> object:  # whatever else the wrapped grid offers (get_nodes, ...)
        return getattr(self.grid, name)

    def _check(self) -> None:
        if self.stop.is_set():
            raise RunStopped("the Flower run was stopped")

    @property
    def run(self) -> object:  # flwr's Run
        return self.grid.run

    def set_run(self, run: object) -> None:
        self.grid.set_run(run)

    def create_message(self, *args: object, **kwargs: object) -> Message:
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        self._check()
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        self._check()
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self._check()
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        """``Grid.send_and_receive`` (replies until all arrived or ``timeout``), ending early on ``stop``."""
        pending = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending and (deadline is None or time.monotonic() < deadline):
            got = list(self.pull_messages(pending))
            replies += got
            pending -= {m.metadata.reply_to_message_id for m in got}
            if pending and self.stop.wait(self.poll):
                self._check()
        return replies


def config_from_run_config(run_config: dict) -> tuple[RunConfig, str, str | None]:
    """(cfg, method, out) from a Flower run config (flat string/number values, overrides as JSON)."""
    try:
        overrides = json.loads(str(run_config.get("overrides", "") or "{}"))
    except ValueError as err:
        raise ValueError(f"run config 'overrides' is not a JSON object: {err}") from None
    if not isinstance(overrides, dict):
        raise ValueError(f"run config 'overrides' must be a JSON object, got {type(overrides).__name__}")
    cfg = preset(str(run_config.get("preset", "smoke")), **overrides)
    out = str(run_config.get("out", "") or "") or None
    return cfg, str(run_config.get("method", "matu")), out


def run_strategy(
    grid: Grid,
    cfg: RunConfig,
    method: str = "matu",
    out: str | Path | None = None,
    reference: dict[str, float] | None = None,
    timeout: float = 3600.0,
    log: Callable[[str], None] = print,
    resume: bool = False,
    overwrite: bool = False,
    stop: threading.Event | None = None,
) -> tuple[RunResult, dict]:
    """Drive one Flower run on ``grid``; returns the ``federation.run``-style result and transport stats.

    ``stop`` (set by ``run_flower`` when it is interrupted) ends the run at its next wait for the clients,
    raising ``RunStopped``; the rounds already written stay in ``metrics.jsonl``.

    Results folders follow ``federation.run``'s rules: a different config is refused, ``overwrite`` moves the
    old folder aside, ``resume`` reuses a finished run. A Flower run keeps no checkpoint, so resuming an
    unfinished one starts again from round 1 in the same folder (``metrics.jsonl`` is rewritten, not appended).
    """
    folder = Path(out) if out is not None else None
    if folder is not None:
        if prepare_folder(folder, folder_config(cfg, method), resume, overwrite):
            saved = json.loads((folder / "metrics.json").read_text())
            log(f"flower {method}: reusing finished run in {folder}")
            return RunResult(method, saved["history"], saved["final"], folder), {"reused": True}
        if (folder / "metrics.jsonl").exists():
            log(f"flower {method}: {folder} holds an unfinished Flower run (no checkpoint); starting again at round 1")
        rewrite_metrics_jsonl(folder, [])

    def on_entry(entry: dict) -> None:
        if stop is not None and stop.is_set():  # the round may hold replies cut off by the shutdown: not written
            raise RunStopped(f"the Flower run was stopped during round {entry['round']}")
        msg = (
            f"flower {method} round {entry['round']}/{cfg.rounds}: {entry['seconds']:.1f}s, "
            f"up {entry['bytes_up'].get('total', 0):,} B"
        )
        log(msg + (f", mean acc {entry['mean_acc']:.3f}" if "mean_acc" in entry else ""))
        if folder is not None:
            write_entry(folder, entry)

    if stop is not None:
        grid = StoppableGrid(grid, stop)
    strategy = make_strategy(cfg, method, reference=reference, on_entry=on_entry)
    t0 = time.perf_counter()
    strategy.start(grid=grid, initial_arrays=ArrayRecord(), num_rounds=cfg.rounds, timeout=timeout)
    if len(strategy.history) != cfg.rounds:
        raise RuntimeError(f"Flower run ended after {len(strategy.history)} of {cfg.rounds} rounds")
    final = strategy.final(time.perf_counter() - t0)
    if folder is not None:
        atomic_write(
            folder / "metrics.json",
            json.dumps(
                {
                    "method": method,
                    "config_id": config_id(folder_config(cfg, method)),
                    "history": strategy.history,
                    "final": final,
                },
                indent=1,
            ),
        )
    stats = {
        "node_of": dict(strategy.node_of),
        "wire_bytes": dict(strategy.wire),
        "state_bytes": strategy.server_state_nbytes(),
    }
    return RunResult(method, strategy.history, final, folder), stats


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run`` / SuperLink deployments (config from the run config)."""
    cfg, method, out = config_from_run_config(dict(context.run_config))
    flags = {k: str(context.run_config.get(k, "false")).lower() == "true" for k in ("resume", "overwrite")}
    run_strategy(grid, cfg, method, out, **flags)
