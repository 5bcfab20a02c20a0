"""Command line: run one method, or compare several on identical clients, splits and seeds.

    python -m matu_lib run --preset cpu --method matu --seed 0 --out results/cpu/matu
    python -m matu_lib compare --preset cpu --out results/cpu            # all methods, one table
    python -m matu_lib compare --preset cpu --tune --out results/cpu-tuned  # baselines' grids on validation
    python -m matu_lib compare --preset smoke --methods matu fedavg --set rounds=3 --set transfer=false
    python -m matu_lib list                                               # presets, methods, tasks
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path


def _parse_overrides(pairs: list[str]) -> dict:
    """``key=value`` pairs; values are Python literals (3, 0.1, true, none, (2,4)) or plain strings."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise SystemExit(f"--set expects key=value, got '{pair}'")
        key, raw = pair.split("=", 1)
        text = {"true": "True", "false": "False", "none": "None"}.get(raw.lower(), raw)
        try:
            out[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            out[key] = raw
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m matu_lib", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "compare"):
        p = sub.add_parser(name)
        p.add_argument("--preset", default="cpu")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--out", type=Path, default=None, help="results folder (resumed if it holds the same run)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
        p.add_argument("--overwrite", action="store_true", help="move an existing results folder aside first")
        p.add_argument("--tune", action="store_true",
                       help="choose FedProx's mu / MaT-FL's group count on validation first (one run per grid value)")
        if name == "run":
            p.add_argument("--method", default="matu")
        else:
            p.add_argument("--methods", nargs="+", default=None)
    sub.add_parser("list")
    args = parser.parse_args(argv)

    from .federation import DEFAULT_COMPARISON, build_context, compare, format_table, run
    from .methods import METHODS
    from .presets import PRESETS, preset

    if args.command == "list":
        from .data import get_task, list_tasks

        print("presets:", ", ".join(PRESETS))
        for name, cls in METHODS.items():
            print(f"method {name:16s} {cls.description}")
        for name in list_tasks():
            spec = get_task(name)
            print(f"task {name:28s} {spec.family:20s} stands in for {spec.stands_in_for}")
        return 0
    try:
        overrides = _parse_overrides(args.set)
        if args.tune:
            overrides["tune_baselines"] = True
        cfg = preset(args.preset, seed=args.seed, **overrides)
    except (KeyError, TypeError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    ctx = build_context(cfg)
    if args.command == "run":
        out = args.out or Path("results") / args.preset / args.method
        result = run(ctx, args.method, out, resume=True, overwrite=args.overwrite)
        print(json.dumps({k: v for k, v in result.final.items() if k != "normalised"}, indent=1))
        print(f"results: {out}")
    else:
        out = args.out or Path("results") / args.preset
        rows = compare(ctx, args.methods or list(DEFAULT_COMPARISON), out, overwrite=args.overwrite)
        print(format_table(rows))
        print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
