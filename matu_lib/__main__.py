"""Command line: run one method, or compare several on identical clients, splits and seeds.

    python -m matu_lib run --preset cpu --method matu --seed 0            # -> results/cpu/seed0/matu
    python -m matu_lib compare --preset cpu --seeds 0 1 2                 # -> results/cpu/seed{0,1,2}/, summary.md
    python -m matu_lib compare --preset cpu --seeds 0 1 2 --results       # + data/results/cpu.md and .json
    python -m matu_lib compare --preset cpu --tune --out results/cpu-tuned  # baselines' grids on validation
    python -m matu_lib compare --preset smoke --methods matu fedavg --set rounds=3 --set transfer=false
    python -m matu_lib list                                               # presets, methods, tasks
    python -m matu_lib run --preset gpu --dry-run                         # the gpu path at toy scale + estimates

Default folders: results/<preset>/seed<s> (one per seed, so seeds never collide; each resumes on its own),
results/<preset>/<key=value-...>/seed<s> with --set overrides. --out replaces results/<preset>[/<overrides>].
compare writes mean ± sd over the seeds and paired differences MaTU - method with bootstrap intervals to
<folder>/summary.md and summary.json; --results also writes them to a results file meant to be committed.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from .presets import default_folder, parse_overrides


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m matu_lib", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "compare"):
        p = sub.add_parser(name)
        p.add_argument("--preset", default="cpu")
        if name == "run":
            p.add_argument("--seed", type=int, default=0)
            p.add_argument("--out", type=Path, default=None, help="results folder (resumed if it holds the same run)")
        else:
            seeds = p.add_mutually_exclusive_group()
            seeds.add_argument("--seed", type=int, default=None, help="one seed (same as --seeds N)")
            seeds.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds to run and aggregate")
            p.add_argument("--out", type=Path, default=None, help="parent folder: one seed<s> folder per seed")
            p.add_argument(
                "--results",
                type=Path,
                nargs="?",
                const=True,
                default=None,
                metavar="PATH.md",
                help="also write the summary to PATH.md and PATH.json (default data/results/<preset>.md)",
            )
            p.add_argument("--bootstrap", type=int, default=10_000, help="bootstrap resamples for the intervals")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
        p.add_argument("--overwrite", action="store_true", help="move an existing results folder aside first")
        p.add_argument(
            "--tune",
            action="store_true",
            help="choose FedProx's mu / MaT-FL's group count on validation first (one run per grid value)",
        )
        if name == "run":
            p.add_argument("--method", default="matu")
            p.add_argument(
                "--dry-run",
                action="store_true",
                help="real-data presets: run the preset's path at toy scale (random weights, fake data), "
                "then print estimated GPU memory, bytes and time per round (matu_lib/dryrun.py)",
            )
            p.add_argument("--dry-steps", type=int, default=1, help="dry run: optimiser steps per task")
            p.add_argument("--dry-batch", type=int, default=2, help="dry run: training batch size")
            p.add_argument("--dry-workers", type=int, default=1, help="dry run: DataLoader workers")
            p.add_argument(
                "--gpu-tflops",
                type=float,
                default=100.0,
                help="dry run: assumed sustained GPU throughput for the time estimate",
            )
        else:
            p.add_argument("--methods", nargs="+", default=None)
    sub.add_parser("list")
    args = parser.parse_args(argv)

    from .backbones import BackboneUnavailable
    from .comparison import DEFAULT_COMPARISON, compare_seeds, seed_folder, write_summary
    from .federation import build_context
    from .methods import METHODS
    from .presets import PRESETS, ConfigError, check_runnable, long_run_warning, preset
    from .results_folder import CheckpointError
    from .tuning import run_method

    if args.command == "list":
        from .data import get_task, list_tasks

        print("presets:", ", ".join(PRESETS))
        for name, cls in METHODS.items():
            print(f"method {name:16s} {cls.description}")
        for name in list_tasks():
            spec = get_task(name)
            print(f"task {name:28s} {spec.family:20s} stands in for {spec.stands_in_for}")
        return 0
    seeds = [args.seed] if args.command == "run" else (args.seeds or [0 if args.seed is None else args.seed])
    try:
        overrides = parse_overrides(args.set)
        if "seed" in overrides:
            raise ValueError("set the seed with --seed/--seeds, not --set seed=...")
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"--seeds must be distinct, got {seeds}")
        if args.command == "compare" and args.bootstrap < 1:
            raise ValueError(f"--bootstrap must be >= 1 (resamples for the intervals), got {args.bootstrap}")
        for s in seeds[1:]:  # each seed's config is checked before the first one's work starts
            preset(args.preset, seed=s, **overrides)
        cfg = preset(args.preset, seed=seeds[0], **overrides)
        methods = [args.method] if args.command == "run" else list(args.methods or DEFAULT_COMPARISON)
        _check_before_work(cfg, methods)
        if isinstance(getattr(args, "results", None), Path) and args.results.suffix != ".md":
            raise ValueError(f"--results expects a path ending in .md (the JSON goes beside it), got {args.results}")
        if args.tune:
            overrides["tune_baselines"] = True
            cfg = preset(args.preset, seed=seeds[0], **overrides)
    except (KeyError, TypeError, ValueError) as err:
        print(f"error: {err.args[0] if err.args else err}", file=sys.stderr)
        return 2
    if args.command == "run" and args.dry_run:
        from .dryrun import DryRunOptions, dry_run

        if args.set:
            print("error: --dry-run takes its scale from --dry-* options, not --set", file=sys.stderr)
            return 2
        try:
            options = DryRunOptions(
                steps=args.dry_steps,
                batch_size=args.dry_batch,
                num_workers=args.dry_workers,
                gpu_tflops=args.gpu_tflops,
            )
            dry_run(args.preset, args.seed, options)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        return 0
    try:
        check_runnable(cfg)  # after the dry run, which runs a real-data preset on whatever device is here
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    warning = long_run_warning(cfg)
    if warning:
        print(warning + " (Ctrl-C stops it; the same command resumes it)", file=sys.stderr, flush=True)
    parent = args.out or default_folder(args.preset, overrides)
    out = args.out or seed_folder(parent, args.seed) / args.method if args.command == "run" else None
    folders = (
        {args.method: out}
        if args.command == "run"
        else {(s, m): seed_folder(parent, s) / m for s in seeds for m in methods}
    )
    try:
        for key, folder in folders.items():
            method, seed = (key, args.seed) if args.command == "run" else (key[1], key[0])
            _check_folder(
                folder,
                {"method": method, **preset(args.preset, seed=seed, **overrides).identity(method)},
                args.overwrite,
            )
    except (CheckpointError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        if args.command == "run":
            result = run_method(build_context(cfg), args.method, out, resume=True, overwrite=args.overwrite)
            print(json.dumps({k: v for k, v in result.final.items() if k not in ("normalised", "ratio")}, indent=1))
            print(f"results: {out}")
            return 0
        summary = compare_seeds(cfg, seeds, methods, parent, overwrite=args.overwrite, n_boot=args.bootstrap)
    except (CheckpointError, ConfigError, OSError, BackboneUnavailable) as err:  # refused folder, file or weights
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        where = (
            f"{args.method} stopped in {out} {_stopped_at(out)}"
            if args.command == "run"
            else f"finished runs and the last whole round of the one in progress are kept under {parent}"
        )
        print(f"interrupted: {where}; rerun the same command to resume", file=sys.stderr)
        return 130
    print((parent / "summary.md").read_text())
    print(f"results: {', '.join(str(seed_folder(parent, s)) for s in seeds)}; summary: {parent / 'summary.md'}")
    if args.results is not None:
        target = Path("data/results") / f"{args.preset}.md" if args.results is True else args.results
        command = "python -m matu_lib " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
        md, js = write_summary(summary, target, command)
        print(f"results file: {md} and {js}")
    return 0


def _check_folder(folder: Path, config: dict, overwrite: bool) -> None:
    """The results-folder refusals of ``federation.run``, checked before the (slow) context is built."""
    import os

    from .results_folder import CheckpointError, FolderBusy, folder_holder, same_run

    holder = folder_holder(folder)
    if holder is not None:
        raise FolderBusy(
            f"{folder} is being written by process {holder}; wait for it to end (or stop it), or choose another --out"
        )
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
    if not same_run(old, json.loads(json.dumps(config))):
        raise FileExistsError(
            f"{folder} holds a run with a different config; choose another --out or pass "
            f"--overwrite (the old results are moved to a .bak folder)"
        )


def _stopped_at(folder: Path) -> str:
    """Where an interrupted run stands: the rounds its checkpoint holds (what a rerun resumes from)."""
    from .results_folder import checkpoint_rounds

    done = checkpoint_rounds(folder)
    return "before its first round finished" if done is None else f"after round {done} (its checkpoint is whole)"


def _check_before_work(cfg, methods: list[str]) -> None:
    """Refuse unknown methods before anything is loaded, trained or written (the config's values are checked by
    ``RunConfig`` itself, what depends on this machine by ``presets.check_runnable``)."""
    from .methods import METHODS

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {sorted(METHODS)}")


if __name__ == "__main__":
    sys.exit(main())
