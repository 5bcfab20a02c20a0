"""Command line: run one method, or compare several on identical clients, splits and seeds.

    python -m matu_lib run --preset cpu --method matu --seed 0 --out results/cpu/matu
    python -m matu_lib compare --preset cpu --out results/cpu            # all methods, one table
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
            raise ValueError(f"--set expects key=value, got '{pair}'")
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
        if name == "run":
            p.add_argument("--method", default="matu")
        else:
            p.add_argument("--methods", nargs="+", default=None)
    sub.add_parser("list")
    args = parser.parse_args(argv)

    from .federation import DEFAULT_COMPARISON, CheckpointError, build_context, compare, format_table, run
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
        cfg = preset(args.preset, seed=args.seed, **_parse_overrides(args.set))
        methods = [args.method] if args.command == "run" else list(args.methods or DEFAULT_COMPARISON)
        _check_before_work(cfg, methods)
    except (KeyError, TypeError, ValueError) as err:
        print(f"error: {err.args[0] if isinstance(err, KeyError) and err.args else err}", file=sys.stderr)
        return 2
    out = args.out or (Path("results") / args.preset / (args.method if args.command == "run" else ""))
    folders = {m: out if args.command == "run" else out / m for m in methods}
    try:
        for m, folder in folders.items():
            _check_folder(folder, {"method": m, **cfg.to_dict()}, args.overwrite)
    except (CheckpointError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        ctx = build_context(cfg)
        if args.command == "run":
            result = run(ctx, args.method, out, resume=True, overwrite=args.overwrite)
            print(json.dumps({k: v for k, v in result.final.items() if k != "normalised"}, indent=1))
        else:
            rows = compare(ctx, methods, out, overwrite=args.overwrite)
            print(format_table(rows))
    except (CheckpointError, OSError) as err:  # folder refused, corrupt checkpoint, unwritable folder: one line
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"results: {out}")
    return 0


def _check_folder(folder: Path, config: dict, overwrite: bool) -> None:
    """The results-folder refusals of ``federation.run``, checked before the (slow) context is built."""
    import os

    from .federation import CheckpointError

    for parent in (folder, *folder.parents):
        if parent.exists():
            if not parent.is_dir():
                raise NotADirectoryError(f"--out: {parent} is a file, not a folder; choose another --out")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise PermissionError(f"--out: cannot write to {parent}; choose another --out")
            break
    cfg_file = folder / "config.json"
    if overwrite or not cfg_file.exists():
        return
    try:
        old = json.loads(cfg_file.read_text())
    except (OSError, ValueError):
        raise CheckpointError(f"{cfg_file} is corrupt; rerun with --overwrite to move {folder} aside") from None
    if old != json.loads(json.dumps(config)):
        raise FileExistsError(f"{folder} holds a run with a different config; choose another --out or pass "
                              f"--overwrite (the old results are moved to a .bak folder)")


def _check_before_work(cfg, methods: list[str]) -> None:
    """Refuse unknown methods and tasks before anything is loaded, trained or written."""
    from .methods import METHODS

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {sorted(METHODS)}")
    if cfg.tasks is not None:
        if cfg.dataset == "real":
            from .data import REAL_TASKS as known
        else:
            from .data import list_tasks

            known = list_tasks()
        bad = [t for t in cfg.tasks if t not in known]
        if bad:
            raise ValueError(f"unknown tasks {bad} for dataset '{cfg.dataset}'; `python -m matu_lib list` shows them")


if __name__ == "__main__":
    sys.exit(main())
