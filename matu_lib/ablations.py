"""MaTU's ablation grid as data, and a runner that trains MaTU once per setting with identical seeds.

    rows = run_ablations(preset("cpu", rounds=2), axes=["masks", "transfer"], out="results/ablations")

``ABLATIONS`` maps an axis (one MaTU component or one property of the federation) to named settings;
a setting is a dict of ``RunConfig`` overrides, and the first setting of every axis is ``{}``: MaTU as the
preset defines it. Identical configurations are trained once (the default appears on every axis) and
every run lives in its own results folder, so a second call reuses finished runs (``resume=True``).

Settings that change only MaTU options reuse the base context (same clients, shards, theta_0, heads);
settings that change anything else (data, partition, trainer: every field not in ``RUN_ONLY_FIELDS``)
build their own. A setting the
preset cannot realise (e.g. too few task slots to cover every task) is reported as skipped, not raised.
Normalised accuracy divides by the base configuration's individual fine-tuning accuracy per task
(same tasks, same test splits), see ``individual_reference``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path

from .federation import build_context, run, run_folder, summarise
from .methods import FedContext
from .presets import RunConfig

ABLATIONS: dict[str, list[tuple[str, dict]]] = {
    "masks": [("MaTU", {}), ("no masks", {"use_masks": False})],
    "rescalers": [("MaTU", {}), ("no rescalers", {"use_rescalers": False})],
    "error feedback": [("MaTU", {}), ("no error feedback", {"error_feedback": False})],
    "transfer": [("MaTU", {}), ("transfer T = 0.1", {"transfer": True}),
                 ("transfer T = 1", {"transfer": True, "transfer_temperature": 1.0}),
                 ("transfer, S > 0.3", {"transfer": True, "transfer_threshold": 0.3})],
    "similarity": [("MaTU", {}), ("transfer by cosine", {"transfer": True}),
                   ("transfer by sign agreement", {"transfer": True, "similarity": "sign"})],
    "election rule": [("MaTU", {}), ("majority of signs", {"elect_rule": "majority"})],
    "magnitude": [("MaTU", {}), ("max magnitude (EMR)", {"magnitude": "max"})],
    "tie rule": [("MaTU", {}), ("tie -> +1", {"tie_rule": "positive"}), ("tie -> 0", {"tie_rule": "zero"})],
    "unified scope": [("MaTU", {}), ("one global vector", {"unified_scope": "global"})],
    "tasks per client": [("MaTU", {}), ("2 each", {"tasks_per_client": (2, 2)}), ("4 each", {"tasks_per_client": (4, 4)})],
    "number of clients": [("MaTU", {}), ("3 clients", {"n_clients": 3}), ("8 clients", {"n_clients": 8})],
    "participation rate": [("MaTU", {}), ("50% per round", {"participation": 0.5})],
    "local steps": [("MaTU", {}), ("3 steps", {"local_steps": 3}), ("24 steps", {"local_steps": 24})],
}

# RunConfig fields that only the run reads (the context -- data, partition, theta_0, heads, trainer -- ignores
# them). Every other field, including ones added later, gets a context of its own: safe by default.
RUN_ONLY_FIELDS = frozenset({"preset", "participation", "rounds", "local_steps", "eval_every", "eval_batch_size",
                             "elect_rule", "tie_rule", "similarity", "transfer", "transfer_temperature",
                             "transfer_threshold", "use_masks", "use_rescalers", "unified_scope", "error_feedback",
                             "magnitude", "fedprox_mu", "matfl_groups", "merge_coefs"})


def axis_keys(axis: str) -> list[str]:
    """The RunConfig fields an axis varies (the default's value of these is what 'MaTU' means there)."""
    return sorted({k for _, overrides in ABLATIONS[axis] for k in overrides})


def individual_reference(ctx: FedContext, out: str | Path | None = None,
                         log: Callable[[str], None] = print) -> dict[str, float]:
    """Individual fine-tuning accuracy per task on ``ctx`` (the normalisation reference), reused from ``out``."""
    folder = run_folder(ctx.cfg, {"method": "individual"}, Path(out)) if out is not None else None
    return run(ctx, "individual", folder, resume=True, log=log).final["acc"]


def _context_for(base: FedContext, cfg: RunConfig, contexts: dict) -> FedContext:
    """The base context when only MaTU options differ; otherwise one built (once) for the data fields."""
    key = json.dumps({k: v for k, v in cfg.to_dict().items() if k not in RUN_ONLY_FIELDS}, sort_keys=True)
    if key not in contexts:
        if all(v == getattr(base.cfg, k) for k, v in vars(cfg).items() if k not in RUN_ONLY_FIELDS):
            contexts[key] = base
        else:
            contexts[key] = build_context(cfg, log=lambda *_: None)
    ctx = contexts[key]
    # same clients and data, this run's options; a fresh cache so memoised vectors of another budget never leak
    return replace(ctx, cfg=cfg, cache={"manifest": ctx.cache.get("manifest")})


def run_ablations(base_cfg: RunConfig, axes: Iterable[str] | None = None, out: str | Path | None = None,
                  log: Callable[[str], None] = print, base_ctx: FedContext | None = None,
                  reference: dict[str, float] | None = None) -> list[dict]:
    """Train MaTU once per distinct setting of ``axes`` (all when None); one tidy row per (axis, setting).

    Row: axis, setting, overrides, value (the axis' fields in this run), status ("ok" or "skipped: why"),
    mean_acc, mean_normalised (NaN without a reference), bytes_up_per_round, bytes_up_parts (per round, by
    component), server_state_bytes, seconds (training time of the run when it was computed), folder.
    """
    axes = list(ABLATIONS) if axes is None else list(axes)
    unknown = [a for a in axes if a not in ABLATIONS]
    if unknown:
        raise KeyError(f"unknown ablation axes {unknown}; choose from {list(ABLATIONS)}")
    out = Path(out) if out is not None else None
    ctx0 = base_ctx if base_ctx is not None else build_context(base_cfg, log=log)
    if reference is None:
        reference = individual_reference(ctx0, out, log=log)
    contexts: dict = {}
    done: dict[str, dict] = {}  # config json -> result fields, so the default runs once for all axes
    rows = []
    for axis in axes:
        for setting, overrides in ABLATIONS[axis]:
            cfg = replace(base_cfg, **overrides)
            key = json.dumps(cfg.to_dict(), sort_keys=True)
            row = {"axis": axis, "setting": setting, "overrides": dict(overrides),
                   "value": ", ".join(f"{k}={getattr(cfg, k)}" for k in axis_keys(axis))}
            if key not in done:
                done[key] = _run_setting(ctx0, cfg, overrides, out, reference, contexts, log)
            rows.append(row | done[key])
    return rows


def _run_setting(ctx0: FedContext, cfg: RunConfig, overrides: dict, out: Path | None, reference: dict,
                 contexts: dict, log: Callable[[str], None]) -> dict:
    try:
        ctx = _context_for(ctx0, cfg, contexts)
    except ValueError as err:  # e.g. the partition cannot cover every task with these clients
        log(f"ablation {overrides}: skipped ({err})")
        return {"status": f"skipped: {err}", "mean_acc": math.nan, "mean_normalised": math.nan,
                "bytes_up_per_round": math.nan, "bytes_up_parts": {}, "server_state_bytes": math.nan,
                "seconds": 0.0, "folder": None}
    changed = {k: v for k, v in overrides.items() if getattr(cfg, k) != getattr(ctx0.cfg, k)}  # no-ops share a folder
    folder = run_folder(cfg, changed, out) if out is not None else None
    res = run(ctx, "matu", folder, reference=reference, resume=True, log=log)
    final = res.final if "mean_normalised" in res.final else res.final | summarise(
        {f"0/{t}": a for t, a in res.final["acc"].items()}, reference)
    parts = mean_bytes_per_round(res.history)
    return {"status": "ok", "mean_acc": final["mean_acc"], "mean_normalised": final["mean_normalised"],
            "bytes_up_per_round": final["bytes_up_per_round"], "bytes_up_parts": parts,
            "server_state_bytes": final["server_state_bytes"], "seconds": final["seconds_total"],
            "folder": str(folder) if folder else None}


# --------------------------------------------------------------- reading finished runs (notebooks 04-06)


def load_histories(folder: str | Path, methods: Iterable[str]) -> dict[str, list[dict]]:
    """Per-round history of each finished run saved by ``federation.compare`` under ``folder/<method>``."""
    return {m: json.loads((Path(folder) / m / "metrics.json").read_text())["history"] for m in methods}


def mean_bytes_per_round(history: list[dict], direction: str = "up") -> dict[str, float]:
    """Bytes per round by component (vectors, masks, rescalers, metadata, total), averaged over rounds."""
    parts: dict[str, float] = {}
    for h in history:
        for k, v in h[f"bytes_{direction}"].items():
            parts[k] = parts.get(k, 0.0) + v / len(history)
    return parts


def bytes_to_target(histories: dict[str, list[dict]], target: float) -> dict[str, float | None]:
    """Cumulative upload bytes when a method's mean accuracy first reaches ``target`` (None: never)."""
    reached = {}
    for method, history in histories.items():
        hits = [h["cum_bytes_up"] for h in history if h.get("mean_acc", -1.0) >= target]
        reached[method] = float(hits[0]) if hits else None
    return reached


def matu_upload_formula(ctx: FedContext, sampled: Iterable[int]) -> int:
    """MaTU's upload in one round without metadata: sum_k 4P + |T_k| (ceil(P/8) + 4) over sampled clients."""
    p = ctx.trainer.n_params
    return sum(4 * p + len(ctx.clients[k].tasks) * (math.ceil(p / 8) + 4) for k in sampled)
