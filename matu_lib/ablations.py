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

# Byte analysis lives with the wire format; these names stay importable from here for the notebooks.
from .communication import bytes_to_target, matu_upload_formula, mean_bytes_per_round  # noqa: F401
from .comparison import invocation, publish
from .federation import build_context, run, summarise
from .methods import FedContext
from .presets import RunConfig
from .results_folder import run_folder

ABLATIONS: dict[str, list[tuple[str, dict]]] = {
    "masks": [("MaTU", {}), ("no masks", {"use_masks": False})],
    "rescalers": [("MaTU", {}), ("no rescalers", {"use_rescalers": False})],
    "error feedback": [("MaTU", {}), ("no error feedback", {"error_feedback": False})],
    "fill dropped": [
        ("MaTU", {}),
        ("start filled, model as modulated", {"fill_dropped": "start"}),
        ("no fill (modulated vector as it is)", {"fill_dropped": "none"}),
    ],
    "transfer": [
        ("MaTU", {}),
        ("transfer T = 0.1", {"transfer": True}),
        ("transfer T = 1", {"transfer": True, "transfer_temperature": 1.0}),
        ("transfer, S > 0.3", {"transfer": True, "transfer_threshold": 0.3}),
    ],
    "similarity": [
        ("MaTU", {}),
        ("transfer by cosine", {"transfer": True}),
        ("transfer by sign agreement", {"transfer": True, "similarity": "sign"}),
        ("transfer by update sketch", {"transfer": True, "similarity": "sketch", "transfer_threshold": 0.05}),
    ],
    "election rule": [("MaTU", {}), ("majority of signs", {"elect_rule": "majority"})],
    "magnitude": [("MaTU", {}), ("max magnitude (EMR)", {"magnitude": "max"})],
    "tie rule": [("MaTU", {}), ("tie -> +1", {"tie_rule": "positive"}), ("tie -> 0", {"tie_rule": "zero"})],
    "unified scope": [("MaTU", {}), ("one global vector", {"unified_scope": "global"})],
    "tasks per client": [
        ("MaTU", {}),
        ("2 each", {"tasks_per_client": (2, 2), "min_clients_per_task": 2}),
        ("3 each", {"tasks_per_client": (3, 3)}),
    ],
    "number of clients": [("MaTU", {}), ("9 clients", {"n_clients": 9}), ("16 clients", {"n_clients": 16})],
    "participation rate": [("MaTU", {}), ("50% per round", {"participation": 0.5})],
    "local steps": [("MaTU", {}), ("3 steps", {"local_steps": 3}), ("12 steps", {"local_steps": 12})],
}

# RunConfig fields that only the run reads (the context -- data, partition, theta_0, heads, trainer -- ignores
# them). Every other field, including ones added later, gets a context of its own: safe by default.
RUN_ONLY_FIELDS = frozenset(
    {
        "preset",
        "participation",
        "rounds",
        "local_steps",
        "eval_every",
        "eval_batch_size",
        "elect_rule",
        "tie_rule",
        "similarity",
        "transfer",
        "transfer_temperature",
        "transfer_threshold",
        "use_masks",
        "use_rescalers",
        "unified_scope",
        "error_feedback",
        "magnitude",
        "fedprox_mu",
        "matfl_groups",
        "merge_coefs",
        "sketch_bits",
        "sketch_source",
        "sketch_center",
        "tune_baselines",
        "upload_bits",
        "upload_topk",
        "download_bits",
        "download_topk",
        "code_block",
        "fill_dropped",
    }
)


def axis_keys(axis: str) -> list[str]:
    """The RunConfig fields an axis varies (the default's value of these is what 'MaTU' means there)."""
    return sorted({k for _, overrides in ABLATIONS[axis] for k in overrides})


def individual_reference(
    ctx: FedContext, out: str | Path | None = None, log: Callable[[str], None] = print
) -> dict[str, float]:
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


def run_ablations(
    base_cfg: RunConfig,
    axes: Iterable[str] | None = None,
    out: str | Path | None = None,
    log: Callable[[str], None] = print,
    base_ctx: FedContext | None = None,
    reference: dict[str, float] | None = None,
) -> list[dict]:
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
            row = {
                "axis": axis,
                "setting": setting,
                "overrides": dict(overrides),
                "value": ", ".join(f"{k}={getattr(cfg, k)}" for k in axis_keys(axis)),
            }
            if key not in done:
                done[key] = _run_setting(ctx0, cfg, overrides, out, reference, contexts, log)
            rows.append(row | done[key])
    return rows


def _run_setting(
    ctx0: FedContext,
    cfg: RunConfig,
    overrides: dict,
    out: Path | None,
    reference: dict,
    contexts: dict,
    log: Callable[[str], None],
) -> dict:
    try:
        ctx = _context_for(ctx0, cfg, contexts)
    except ValueError as err:  # e.g. the partition cannot cover every task with these clients
        log(f"ablation {overrides}: skipped ({err})")
        return {
            "status": f"skipped: {err}",
            "mean_acc": math.nan,
            "mean_normalised": math.nan,
            "bytes_up_per_round": math.nan,
            "bytes_up_parts": {},
            "server_state_bytes": math.nan,
            "seconds": 0.0,
            "folder": None,
        }
    changed = {k: v for k, v in overrides.items() if getattr(cfg, k) != getattr(ctx0.cfg, k)}  # no-ops share a folder
    folder = run_folder(cfg, changed, out) if out is not None else None
    res = run(ctx, "matu", folder, reference=reference, resume=True, log=log)
    final = (
        res.final
        if "mean_normalised" in res.final
        else res.final | summarise({f"0/{t}": a for t, a in res.final["acc"].items()}, reference)
    )
    parts = mean_bytes_per_round(res.history)
    return {
        "status": "ok",
        "mean_acc": final["mean_acc"],
        "mean_normalised": final["mean_normalised"],
        "bytes_up_per_round": final["bytes_up_per_round"],
        "bytes_up_parts": parts,
        "server_state_bytes": final["server_state_bytes"],
        "seconds": final["seconds_total"],
        "folder": str(folder) if folder else None,
    }


# --------------------------------------------------------------- reading finished runs (notebooks 04-06)


def load_histories(folder: str | Path, methods: Iterable[str]) -> dict[str, list[dict]]:
    """Per-round history of each finished run saved by ``comparison.compare`` under ``folder/<method>``."""
    return {m: json.loads((Path(folder) / m / "metrics.json").read_text())["history"] for m in methods}


# ------------------------------------------------------------ choosing an option on validation, over seeds


def validate_settings(
    base_cfg: RunConfig,
    settings: list[tuple[str, dict]],
    seeds: Iterable[int],
    out: str | Path | None = None,
    n_boot: int = 10_000,
    log: Callable[[str], None] = print,
    split: str = "val",
) -> dict:
    """Choose between MaTU settings the way every default of this project is chosen: on *validation* splits.

    Each setting (name, RunConfig overrides; the first is the reference, usually the current default) is run
    once per seed with ``eval_split="val"`` into ``out/seed<s>/<setting folder>`` (resumable). Returns, per
    setting: mean ± sd over seeds of the mean validation accuracy, the paired difference to the first setting
    over (seed, task) with a bootstrap 95% interval (``stats.paired_difference``), and the family ARI of the
    server's two similarity measures at the last round.

    ``split="test"`` runs the same settings on test splits: how a choice already made on validation is
    *reported* (its paired effect on test), never how it is made. Runs are evaluated at their last round only
    (the final numbers are the same whichever rounds are evaluated; the similarity is logged every round).
    """
    if split not in ("val", "test"):
        raise ValueError(f"split must be 'val' or 'test', got {split!r}")
    from . import geometry
    from .stats import mean_sd, paired_difference

    seeds = [int(s) for s in seeds]
    scores: dict[str, dict[int, dict[str, float]]] = {name: {} for name, _ in settings}
    aris: dict[str, dict[str, list[float]]] = {name: {"vector": [], "sketch": []} for name, _ in settings}
    for seed in seeds:
        cfg0 = replace(base_cfg, seed=seed, eval_split=split, eval_every=base_cfg.rounds)
        ctx0, contexts = build_context(cfg0, log=log), {}
        families = {t: getattr(_spec(t), "family", t) for t in ctx0.tasks}
        order = geometry.family_order(ctx0.tasks, families)
        for name, overrides in settings:
            cfg = replace(cfg0, **overrides)
            # named by what differs from the preset: a setting equal to the default is the default's run, so
            # several choices validated into one ``out`` train that run once
            changed = {k: v for k, v in overrides.items() if getattr(cfg0, k) != v}
            folder = run_folder(cfg, changed, Path(out) / f"seed{seed}") if out is not None else None
            res = run(_context_for(ctx0, cfg, contexts), "matu", folder, resume=True, log=log)
            scores[name][seed] = res.final["acc"]
            for measure in ("vector", "sketch"):
                series = geometry.server_similarity_rounds(res.history, order, families, f"similarity_{measure}")
                if series["ari"]:
                    aris[name][measure].append(series["ari"][-1])
    tasks = sorted(next(iter(scores.values()))[seeds[0]])
    grid = {name: [[scores[name][s][t] for t in tasks] for s in seeds] for name in scores}
    first = settings[0][0]
    rows = []
    for name, overrides in settings:
        mean, sd = mean_sd(sum(row) / len(row) for row in grid[name])
        row = {
            "setting": name,
            "overrides": overrides,
            "mean_acc": mean,
            "sd": sd,
            "per_seed": [sum(r) / len(r) for r in grid[name]],
            "ari_vector_last": aris[name]["vector"],
            "ari_sketch_last": aris[name]["sketch"],
        }
        if name != first:
            row["minus_first"] = paired_difference(grid[name], grid[first], n_boot=n_boot)
        rows.append(row)
    return {"preset": base_cfg.preset, "seeds": seeds, "split": split, "reference_setting": first, "rows": rows}


def format_validation(summary: dict, command: str | None = None) -> str:
    """Markdown for ``validate_settings``: a row per setting, the paired difference to the first one."""

    def fmt(xs: list[float]) -> str:
        return ", ".join(f"{x:.2f}" for x in xs) or "-"

    val = summary.get("split", "val") == "val"
    lines = [
        f"# {'Choosing' if val else 'Reporting on test (chosen on validation)'} MaTU's options: "
        f"`{summary['preset']}` preset, seeds {', '.join(map(str, summary['seeds']))}",
        "",
    ]
    if command:
        lines += [f"Written by `{command}`.", ""]
    lines += [
        f"Mean **{'validation' if val else 'test'}** accuracy (absolute) over seeds; difference to the first setting "
        "paired on (seed, "
        "task), bootstrap 95% interval; ARI of the server's similarity against the task families at the last "
        "round, per seed (vector cosine of averaged task vectors / update sketches).",
        "",
        f"| setting | {'val' if val else 'test'} acc (mean ± sd) | per seed | minus {summary['reference_setting']} | "
        "ARI vector | ARI sketch |",
        "|---|---|---|---|---|---|",
    ]
    for r in summary["rows"]:
        d = r.get("minus_first")
        diff = f"{d['mean']:+.4f} [{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}]" if d else "-"
        lines.append(
            f"| {r['setting']} | {r['mean_acc']:.4f} ± {r['sd']:.4f} | {fmt(r['per_seed'])} | {diff} "
            f"| {fmt(r['ari_vector_last'])} | {fmt(r['ari_sketch_last'])} |"
        )
    return "\n".join(lines) + "\n"


def _spec(task: str):
    from .data import get_task

    try:
        return get_task(task)
    except KeyError:  # a real dataset: no family registry
        return None


VALIDATIONS: dict[str, list[tuple[str, dict]]] = {
    # what the update sketch is of (accuracy is the same without transfer: the choice rests on the family ARI of
    # the server's sketch similarity, which training data alone decides; docs/method.md, "Why an update sketch")
    "sketch_center": [
        ("sketches of centred updates", {"sketch_center": "client"}),
        ("sketches of raw updates", {"sketch_center": "none"}),
    ],
    # how the server compares tasks, and whether it transfers between related ones (docs/method.md, "Options and
    # defaults")
    "transfer": [
        ("no transfer", {"transfer": False}),
        ("transfer by update sketch", {"transfer": True, "similarity": "sketch", "transfer_threshold": 0.05}),
        # softmax(S / T) with T = 0.1 leaves a related task at S = 0.3 a weight of exp(-7) next to the task
        # itself: two settings that let related tasks actually contribute
        (
            "transfer by update sketch, T = 0.3, S > 0.15",
            {"transfer": True, "similarity": "sketch", "transfer_temperature": 0.3, "transfer_threshold": 0.15},
        ),
        (
            "transfer by update sketch, T = 1, S > 0.15",
            {"transfer": True, "similarity": "sketch", "transfer_temperature": 1.0, "transfer_threshold": 0.15},
        ),
        ("transfer by vector cosine", {"transfer": True, "similarity": "cosine"}),
        (
            "transfer by round sketch",
            {
                "transfer": True,
                "similarity": "sketch",
                "transfer_threshold": 0.05,
                "sketch_source": "round",
                "sketch_bits": 1024,
            },
        ),
    ],
    # what fills the coordinates a task's mask drops: nothing (the paper's modulated vector), or the client's own
    # last trained vector of the task, for the training start only or for the model it uses too
    # the elected magnitude over the tasks that agree with the elected sign: their mean (TIES) or largest (EMR)
    "magnitude": [("mean magnitude (TIES)", {"magnitude": "mean"}), ("max magnitude (EMR)", {"magnitude": "max"})],
    # clients carry what unification dropped into their next upload (client state; the server stays stateless)
    "error_feedback": [("error feedback", {"error_feedback": True}), ("no error feedback", {"error_feedback": False})],
    "fill_dropped": [
        ("modulated vector as it is", {"fill_dropped": "none"}),
        ("own vector fills the start", {"fill_dropped": "start"}),
        ("own vector fills the start and the model", {"fill_dropped": "model"}),
    ],
}


def main(argv: list[str] | None = None) -> int:
    """``python -m matu_lib.ablations validate --preset cpu --choice transfer --seeds 0 1 2 --results PATH.md``"""
    import argparse
    import sys

    from .presets import study_preset

    parser = argparse.ArgumentParser(prog="python -m matu_lib.ablations", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("validate", help="run the settings of one choice on validation splits over seeds")
    p.add_argument("--preset", default="cpu")
    p.add_argument("--choice", default="transfer", choices=sorted(VALIDATIONS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument(
        "--split",
        choices=("val", "test"),
        default="val",
        help="test: report the paired effect of a choice already made on validation",
    )
    p.add_argument("--only", nargs="+", default=None, metavar="SETTING", help="a subset of the settings (first kept)")
    p.add_argument("--out", type=Path, default=None, help="default: results/<preset>-validation/<choice>")
    p.add_argument("--results", type=Path, default=None, metavar="PATH.md", help="also write Markdown + JSON here")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    args = parser.parse_args(argv)
    settings = VALIDATIONS[args.choice]
    if args.only:
        unknown = sorted(set(args.only) - {n for n, _ in settings})
        if unknown:
            print(f"error: unknown settings {unknown}; choose from {[n for n, _ in settings]}", file=sys.stderr)
            return 2
        settings = [settings[0]] + [s for s in settings[1:] if s[0] in args.only]
    try:
        cfg = study_preset(args.preset, args.set, eval_split=args.split)
    except (KeyError, TypeError, ValueError) as err:
        print(f"error: {err.args[0] if err.args else err}", file=sys.stderr)
        return 2
    out = args.out or Path("results") / f"{args.preset}-{'validation' if args.split == 'val' else 'test'}" / args.choice
    summary = validate_settings(cfg, settings, args.seeds, out, split=args.split)
    text = format_validation(summary, invocation("matu_lib.ablations", argv))
    return publish(text, summary, args.results)


if __name__ == "__main__":
    raise SystemExit(main())
