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
import time
from collections.abc import Callable
from pathlib import Path

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from ..federation import RunResult
from ..presets import RunConfig, preset
from ..results_folder import atomic_write, config_id, folder_config, prepare_folder, rewrite_metrics_jsonl
from .strategy import make_strategy, write_entry

app = ServerApp()


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


def run_strategy(grid: Grid, cfg: RunConfig, method: str = "matu", out: str | Path | None = None,
                 reference: dict[str, float] | None = None, timeout: float = 3600.0,
                 log: Callable[[str], None] = print, resume: bool = False,
                 overwrite: bool = False) -> tuple[RunResult, dict]:
    """Drive one Flower run on ``grid``; returns the ``federation.run``-style result and transport stats.

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
        msg = f"flower {method} round {entry['round']}/{cfg.rounds}: {entry['seconds']:.1f}s, " \
              f"up {entry['bytes_up'].get('total', 0):,} B"
        log(msg + (f", mean acc {entry['mean_acc']:.3f}" if "mean_acc" in entry else ""))
        if folder is not None:
            write_entry(folder, entry)

    strategy = make_strategy(cfg, method, reference=reference, on_entry=on_entry)
    t0 = time.perf_counter()
    strategy.start(grid=grid, initial_arrays=ArrayRecord(), num_rounds=cfg.rounds, timeout=timeout)
    if len(strategy.history) != cfg.rounds:
        raise RuntimeError(f"Flower run ended after {len(strategy.history)} of {cfg.rounds} rounds")
    final = strategy.final(time.perf_counter() - t0)
    if folder is not None:
        atomic_write(folder / "metrics.json",
                      json.dumps({"method": method, "config_id": config_id(folder_config(cfg, method)),
                                  "history": strategy.history, "final": final}, indent=1))
    stats = {"node_of": dict(strategy.node_of), "wire_bytes": dict(strategy.wire),
             "state_bytes": strategy.server_state_nbytes()}
    return RunResult(method, strategy.history, final, folder), stats


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run`` / SuperLink deployments (config from the run config)."""
    cfg, method, out = config_from_run_config(dict(context.run_config))
    flags = {k: str(context.run_config.get(k, "false")).lower() == "true" for k in ("resume", "overwrite")}
    run_strategy(grid, cfg, method, out, **flags)
