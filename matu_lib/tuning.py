"""Validation selection for the iterative baselines (FedProx's mu, MaT-FL grouping's group count).

MaTU's options and the merging coefficients are chosen on validation splits; a comparison is only fair if
the iterative baselines get the same treatment. Each of them names the RunConfig field it is tuned on
(``Method.tuned_field``) and its grid is ``methods.GRIDS[field]``. Tuning costs one full run per grid value,
so it is opt-in (``RunConfig.tune_baselines``, ``python -m matu_lib compare --tune``):

    value, record = select_on_validation(ctx, "fedprox")        # runs on ctx.val, never on test
    result = run_tuned(ctx, "fedprox", out="results/cpu/fedprox")  # the chosen value's run, record in final

The record (field, grid, mean validation accuracy per value, choice) goes into the run's ``metrics.json``
under ``final["tuning"]``. With ``out``, the validation runs live beside the run in ``<out>-tuning/<field>=<v>``
and are resumed or reused like any other run.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from .federation import RunResult, build_context, run
from .methods import GRIDS, METHODS, FedContext
from .presets import preset
from .results_folder import atomic_write


def tuned_field(method: str) -> str:
    """The RunConfig field ``method`` is tuned on; one clear error for a method without a grid."""
    if method not in METHODS:
        raise KeyError(f"unknown method '{method}'; choose from {sorted(METHODS)}")
    field = METHODS[method].tuned_field
    if field is None:
        tunable = sorted(m for m, cls in METHODS.items() if cls.tuned_field)
        raise ValueError(f"method '{method}' has no hyper-parameter grid to tune; tunable: {tunable}")
    return field


def tuning_folder(out: str | Path) -> Path:
    """Where the validation runs of the run in ``out`` live: a sibling, so ``out`` stays a plain results folder."""
    out = Path(out)
    return out.with_name(out.name + "-tuning")


def select_on_validation(
    ctx: FedContext,
    method: str,
    grid: Sequence[Any] | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> tuple[Any, dict]:
    """Run ``method`` once per grid value on the *validation* splits; the best mean accuracy wins.

    Every run is a full federated run (all rounds) evaluated once, after the last round, on ``ctx.val``.
    Ties go to the earliest grid value, so the choice is deterministic. ``grid`` defaults to
    ``GRIDS[field]``. Returns (chosen value, record) where the record holds the field, the grid, the mean
    validation accuracy of every value and the choice.
    """
    field = tuned_field(method)
    values = tuple(GRIDS[field] if grid is None else grid)
    if not values:
        raise ValueError(f"empty grid for {method}.{field}")
    cfg = ctx.cfg
    scores = []
    for value in values:
        sub_cfg = replace(cfg, **{field: value}, eval_split="val", eval_every=cfg.rounds, tune_baselines=False)
        folder = tuning_folder(out) / f"{field}={value}" if out is not None else None
        res = run(replace(ctx, cfg=sub_cfg), method, folder, resume=True, overwrite=overwrite, log=log)
        score = float(res.final["mean_acc"])
        if math.isnan(score):
            raise ValueError(f"{method} with {field}={value} gave NaN validation accuracy")
        scores.append(score)
        log(f"{method} tuning: {field}={value} -> validation mean acc {score:.4f}")
    best = max(range(len(values)), key=lambda i: (scores[i], -i))
    record = {"field": field, "grid": list(values), "val_mean_acc": scores, "chosen": values[best], "split": "val"}
    log(f"{method} tuning: chose {field}={values[best]}")
    return values[best], record


def run_tuned(
    ctx: FedContext,
    method: str,
    out: str | Path | None = None,
    grid: Sequence[Any] | None = None,
    log: Callable[[str], None] = print,
    overwrite: bool = False,
    **run_kwargs: Any,
):
    """Tune ``method`` on validation, then run the chosen value on ``ctx.cfg.eval_split`` (test by default).

    The reported run is an ordinary run with the chosen value in its config; its ``final["tuning"]``
    (and ``metrics.json``) holds the selection record.
    """
    value, record = select_on_validation(ctx, method, grid=grid, out=out, overwrite=overwrite, log=log)
    best_cfg = replace(ctx.cfg, **{record["field"]: value}, tune_baselines=False)
    res = run(replace(ctx, cfg=best_cfg), method, out, overwrite=overwrite, log=log, **run_kwargs)
    if res.final:  # empty when stopped early (stop_after): nothing to report yet
        res.final["tuning"] = record
        if res.folder is not None:
            path = Path(res.folder) / "metrics.json"
            saved = json.loads(path.read_text())
            saved["final"] = res.final
            atomic_write(path, json.dumps(saved, indent=1))
    return res


def run_method(
    ctx: FedContext, method: str, out: str | Path | None = None, log: Callable[[str], None] = print, **run_kwargs: Any
) -> RunResult:
    """``federation.run``, or ``run_tuned`` when ``ctx.cfg.tune_baselines`` asks for a method that has a grid.

    The one entry point for callers that honour ``tune_baselines`` (``comparison.compare``, the command line)."""
    if ctx.cfg.tune_baselines and METHODS[method].tuned_field:
        return run_tuned(ctx, method, out, log=log, **run_kwargs)
    return run(ctx, method, out, log=log, **run_kwargs)


def main(argv: list[str] | None = None) -> int:
    """``python -m matu_lib.tuning --preset cpu --seed 0 --methods fedprox matfl_grouping --results PATH.json``

    Tunes each baseline on the validation splits of one seed and writes the records; the preset then fixes the
    chosen values, so a multi-seed comparison does not pay one run per grid value per seed.
    """
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m matu_lib.tuning", description=main.__doc__)
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="+", default=["fedprox", "matfl_grouping"])
    parser.add_argument("--out", type=Path, default=None, help="validation runs (default results/<preset>-tuning)")
    parser.add_argument("--results", type=Path, default=None, metavar="PATH.json")
    args = parser.parse_args(argv)
    try:
        fields = {m: tuned_field(m) for m in args.methods}
        cfg = preset(args.preset, seed=args.seed)
    except (KeyError, ValueError) as err:
        print(f"error: {err.args[0] if err.args else err}", file=sys.stderr)
        return 2
    ctx = build_context(cfg)
    out = args.out or Path("results") / f"{args.preset}-tuning"
    records = {m: select_on_validation(ctx, m, out=out / f"seed{args.seed}" / m)[1] for m in fields}
    text = json.dumps({"preset": args.preset, "seed": args.seed, "records": records}, indent=1)
    print(text)
    if args.results is not None:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
