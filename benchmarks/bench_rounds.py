"""Seconds per round and peak memory per method (a benchmark script, not a test).

    python benchmarks/bench_rounds.py --preset smoke
    python benchmarks/bench_rounds.py --preset cpu --methods matu fedavg per_task_fedavg

Each method runs in its own child process so that its peak resident memory (ru_maxrss) is its own.
Figures depend on the machine and its load; they are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

DEFAULT = ("matu", "fedavg", "fedprox", "per_task_fedavg", "matfl_grouping", "local", "individual", "emr")


def child(preset_name: str, method: str, seed: int) -> None:
    os.environ.setdefault("MATU_PROGRESS", "0")
    from matu_lib.federation import build_context, run
    from matu_lib.presets import preset

    t0 = time.perf_counter()
    ctx = build_context(preset(preset_name, seed=seed), log=lambda *_: None)
    setup = time.perf_counter() - t0
    res = run(ctx, method, log=lambda *_: None)
    per_round = [h["seconds"] for h in res.history]
    print(
        json.dumps(
            {
                "method": method,
                "setup_s": round(setup, 2),
                "rounds": len(per_round),
                "s_per_round": round(sum(per_round) / len(per_round), 2),
                "total_s": round(sum(per_round), 2),
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                "mean_acc": round(res.final["mean_acc"], 4),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="smoke")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.preset, args.child, args.seed)
        return
    print(f"preset {args.preset}, {os.cpu_count()} CPUs; non-iterative methods count their whole budget as one round")
    print(
        f"{'method':18s} {'rounds':>6s} {'s/round':>8s} {'total s':>8s} {'setup s':>8s} {'peak MB':>8s} "
        f"{'mean acc':>8s}"
    )
    for method in args.methods:
        out = subprocess.run(
            [sys.executable, __file__, "--preset", args.preset, "--seed", str(args.seed), "--child", method],
            capture_output=True,
            text=True,
            check=True,
        )
        row = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"{method:18s} {row['rounds']:6d} {row['s_per_round']:8.2f} {row['total_s']:8.2f} "
            f"{row['setup_s']:8.2f} {row['peak_rss_mb']:8.1f} {row['mean_acc']:8.3f}"
        )


if __name__ == "__main__":
    main()
