"""The communication study: accuracy against bytes for MaTU and per-task FedAvg under the same compressors.

    python -m matu_lib.communication_study --preset cpu --seeds 0 1 2 --split test \\
        --results PATH.md

Every method x coding setting (``SETTINGS``: ``RunConfig`` overrides of the upload/download coding fields) is
trained once per seed. Float32 runs live where ``comparison.compare`` puts them (``<out>/seed<s>/<method>``),
so a comparison already on disk is reused; coded runs sit beside them (``<method>@<setting slug>``). The
result, per (method, setting): mean ± sd over seeds of the absolute and the chance-corrected normalised
accuracy (reference: individual fine-tuning of the same seed and split), bytes per client and round up and
down (serialised bytes), bits per parameter per task held, the server's time per round, the paired
difference to float32 MaTU with a bootstrap 95% interval, and the Pareto frontier of accuracy against upload.

``choose_setting`` is how the default coding is picked, on validation splits: the smallest upload among the
MaTU settings whose mean normalised accuracy stays within ``tolerance`` of float32 MaTU.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path

import numpy as np

from .comparison import invocation, publish
from .federation import build_context, chance_levels, run
from .methods import FedContext
from .presets import RunConfig
from .stats import mean_sd, normalise, paired_difference, unlearnable

# name -> RunConfig overrides; the first is the uncompressed reference. Downloads are coded too (the same
# quantiser without feedback: MaTU's server keeps no state to carry a residual in).
SETTINGS: dict[str, dict] = {
    "float32": {},
    "8-bit": {"upload_bits": 8, "download_bits": 8},
    "1-bit up, 8-bit down": {"upload_bits": 1, "download_bits": 8},
    "1-bit top-25% up, 8-bit down": {"upload_bits": 1, "upload_topk": 0.25, "download_bits": 8},
    "1-bit top-10% up, 8-bit down": {"upload_bits": 1, "upload_topk": 0.1, "download_bits": 8},
    "1-bit top-10% up, 4-bit down": {"upload_bits": 1, "upload_topk": 0.1, "download_bits": 4},
}
METHODS = ("matu", "per_task_fedavg")
REFERENCE = ("matu", "float32")


def slug(overrides: dict) -> str:
    """A folder-safe name for a coding setting (empty for float32, which uses compare's folder)."""
    parts = []
    for side in ("upload", "download"):
        bits, topk = overrides.get(f"{side}_bits", 32), overrides.get(f"{side}_topk", 1.0)
        if bits != 32 or topk < 1:
            parts.append(f"{side[:2] if side == 'upload' else 'down'}{bits}" + (f"top{topk:g}" if topk < 1 else ""))
    if "code_block" in overrides:
        parts.append(f"block{overrides['code_block']}")
    return "-".join(parts)


def study_runs(
    ctx: FedContext,
    folder: str | Path,
    methods: Iterable[str] = METHODS,
    settings: dict[str, dict] | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """One seed: the individual reference and every (method, setting) run in ``folder`` (float32 runs under
    ``<folder>/<method>``, where ``comparison.compare`` and notebook 04 put them, coded ones beside them as
    ``<method>@<slug>``); finished runs are reused."""
    folder = Path(folder)
    reference = run(ctx, "individual", folder / "individual", resume=True, log=log).final["acc"]
    runs = {}
    for method in methods:
        for name, overrides in (SETTINGS if settings is None else settings).items():
            # coded runs evaluate at the last round only: most of a run's time, and the final accuracy is the same
            # whichever rounds are evaluated (tested); float32 keeps the preset's config, so compare's runs are reused
            cfg = replace(ctx.cfg, **overrides, eval_every=ctx.cfg.rounds) if overrides else ctx.cfg
            c = replace(ctx, cfg=cfg, cache={"manifest": ctx.cache.get("manifest")})
            name_ = slug(overrides)
            runs[(method, name)] = run(
                c, method, folder / (f"{method}@{name_}" if name_ else method), resume=True, log=log
            )
    return {
        "reference": reference,
        "runs": runs,
        "chance": chance_levels(ctx),
        "n_params": ctx.trainer.n_params,
        "tasks_per_client": sum(len(c.tasks) for c in ctx.clients) / len(ctx.clients),
    }


def run_study(
    base: RunConfig,
    seeds: Iterable[int],
    out: str | Path,
    settings: dict[str, dict] | None = None,
    methods: Iterable[str] = METHODS,
    n_boot: int = 10_000,
    log: Callable[[str], None] = print,
) -> dict:
    """``study_runs`` once per seed (into ``<out>/seed<s>``, compare's layout) and ``summarise_study``."""
    settings = dict(SETTINGS if settings is None else settings)
    methods = list(methods)
    per_seed = {
        int(s): study_runs(
            build_context(replace(base, seed=int(s)), log=log), Path(out) / f"seed{int(s)}", methods, settings, log
        )
        for s in seeds
    }
    return summarise_study(per_seed, settings, methods, base, n_boot)


def summarise_study(
    per_seed: dict, settings: dict[str, dict], methods: list[str], base: RunConfig, n_boot: int = 10_000
) -> dict:
    """Mean ± sd over seeds per (method, setting), paired differences to float32 MaTU, Pareto flags."""
    seeds = sorted(per_seed)
    first = per_seed[seeds[0]]
    chance, n_params, tasks_held = first["chance"], first["n_params"], first["tasks_per_client"]
    tasks = sorted(per_seed[seeds[0]]["reference"])
    flagged = sorted(t for t in tasks if unlearnable([per_seed[s]["reference"][t] for s in seeds], chance[t]))
    learnable = [t for t in tasks if t not in flagged]
    rows, grids = [], {}
    for method in methods:
        for name, overrides in settings.items():
            acc, norm, up, down, server = [], [], [], [], []
            for s in seeds:
                res = per_seed[s]["runs"][(method, name)]
                a = res.final["acc"]
                n = normalise(a, per_seed[s]["reference"], chance, flagged)
                acc.append([a[t] for t in tasks])
                norm.append([n["normalised"][t] for t in learnable])
                clients = [len(h["sampled"]) for h in res.history]
                up.append(np.mean([h["bytes_up"].get("total", 0) / k for h, k in zip(res.history, clients)]))
                down.append(np.mean([h["bytes_down"].get("total", 0) / k for h, k in zip(res.history, clients)]))
                times = [h["server_seconds"] for h in res.history if "server_seconds" in h]
                server.append(float(np.mean(times)) if times else math.nan)
            grids[(method, name)] = np.array(norm), np.array(acc)
            up_mean = float(np.mean(up))
            rows.append(
                {
                    "method": method,
                    "setting": name,
                    "overrides": overrides,
                    "mean_acc": mean_sd(np.array(acc).mean(axis=1)),
                    "mean_normalised": mean_sd(np.array(norm).mean(axis=1)),
                    "up_bytes_per_client_round": up_mean,
                    "down_bytes_per_client_round": float(np.mean(down)),
                    "up_bits_per_param_per_task": 8 * up_mean / (n_params * tasks_held),
                    "server_seconds_per_round": mean_sd(server) if not any(math.isnan(x) for x in server) else None,
                    "per_seed_normalised": [float(x) for x in np.array(norm).mean(axis=1)],
                }
            )
    ref_norm, ref_acc = grids[REFERENCE]
    fedavg_up = next(
        (
            r["up_bytes_per_client_round"]
            for r in rows
            if r["method"] == "per_task_fedavg" and r["setting"] == "float32"
        ),
        None,
    )
    for r in rows:
        norm, acc = grids[(r["method"], r["setting"])]
        if (r["method"], r["setting"]) != REFERENCE:
            r["minus_matu_float32"] = {
                "normalised": paired_difference(norm, ref_norm, n_boot),
                "acc": paired_difference(acc, ref_acc, n_boot),
            }
        if fedavg_up:
            r["up_fraction_of_per_task_fedavg"] = r["up_bytes_per_client_round"] / fedavg_up
    # the same budget: each setting against the other method's most accurate setting uploading no more; the
    # difference is always MaTU minus per-task FedAvg, paired on (seed, task)
    if {"matu", "per_task_fedavg"} <= set(methods):
        for r in rows:
            other = "per_task_fedavg" if r["method"] == "matu" else "matu"
            fits = [
                o
                for o in rows
                if o["method"] == other and o["up_bytes_per_client_round"] <= r["up_bytes_per_client_round"]
            ]
            if not fits:
                continue
            o = max(fits, key=lambda o: o["mean_normalised"][0])
            a, b = (r, o) if r["method"] == "matu" else (o, r)
            (na, aa), (nb, ab) = grids[("matu", a["setting"])], grids[("per_task_fedavg", b["setting"])]
            r["same_budget"] = {
                "other": other,
                "setting": o["setting"],
                "normalised": paired_difference(na, nb, n_boot),
                "acc": paired_difference(aa, ab, n_boot),
            }
    for method in methods:  # Pareto frontier per method: no other setting has less upload and more accuracy
        mine = [r for r in rows if r["method"] == method]
        for r in mine:
            r["pareto"] = not any(
                o["up_bytes_per_client_round"] <= r["up_bytes_per_client_round"]
                and o["mean_normalised"][0] > r["mean_normalised"][0]
                and o is not r
                for o in mine
            )
    return {
        "preset": base.preset,
        "split": base.eval_split,
        "seeds": seeds,
        "tasks": tasks,
        "flagged": flagged,
        "n_params": n_params,
        "tasks_per_client": tasks_held,
        "rows": rows,
        "config": {k: v for k, v in json.loads(json.dumps(base.identity())).items() if k != "seed"},
    }


def choose_setting(summary: dict, tolerance: float = 0.02, method: str = "matu") -> str:
    """The setting with the smallest upload whose mean normalised accuracy is within ``tolerance`` of float32
    MaTU's (read on validation splits: this is how the default coding is chosen)."""
    rows = [r for r in summary["rows"] if r["method"] == method]
    ref = next(r for r in rows if r["setting"] == REFERENCE[1])["mean_normalised"][0]
    ok = [r for r in rows if r["mean_normalised"][0] >= ref - tolerance]
    return min(ok, key=lambda r: r["up_bytes_per_client_round"])["setting"]


def _versus(row: dict, both: bool) -> str:
    v = row.get("same_budget")
    if not both:
        return "-"
    if v is None:
        return "the other method has no setting this cheap"
    d = v["normalised"]
    return f"{d['mean']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}] vs {v['other']} `{v['setting']}`"


def _pm(mean_sd_: list[float] | tuple[float, float]) -> str:
    mean, sd = mean_sd_
    return f"{mean:.3f}" if math.isnan(sd) else f"{mean:.3f} ± {sd:.3f}"


def _kb(x: float) -> str:
    return f"{x / 1e3:.1f} kB"


def format_study(summary: dict, command: str | None = None) -> str:
    seeds = ", ".join(map(str, summary["seeds"]))
    both = {"matu", "per_task_fedavg"} <= {r["method"] for r in summary["rows"]}  # the same-budget column
    lines = [f"# Accuracy against bytes: `{summary['preset']}` preset, {summary['split']} split, seeds {seeds}", ""]
    if command:
        lines += [f"Written by `{command}`.", ""]
    lines += [
        f"Encoder: {summary['n_params']:,} parameters; {summary['tasks_per_client']:.2f} tasks per client on average. "
        "Mean ± sd over seeds. **Normalised** = (acc - chance) / (individual - chance), averaged over the learnable "
        f"tasks (flagged: {', '.join(summary['flagged']) or 'none'}); **abs** = absolute accuracy. Bytes are "
        "serialised bytes per client and round (JSON header included); bits/param/task = 8 x upload / (parameters "
        "x tasks held). Differences are setting - float32 MaTU, paired on (seed, task), bootstrap 95% interval. "
        "Server time: wall seconds of the server's half of a round (decode, screen, aggregate, code downloads), "
        "measured inside the run (other work on the machine adds noise; '-' for runs recorded before it was "
        "measured). Last column: this setting against the other method's most accurate setting that uploads no more, "
        "always as MaTU minus per-task FedAvg, paired on (seed, task).",
        "",
        "| method | setting | normalised | abs | minus float32 MaTU (normalised) | upload / client / round | "
        "x per-task FedAvg float32 | bits/param/task | download / client / round | server s/round | Pareto | "
        "same budget: MaTU - per-task FedAvg (normalised) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["rows"]:
        d = r.get("minus_matu_float32", {}).get("normalised")
        diff = f"{d['mean']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]" if d else "-"
        t = r["server_seconds_per_round"]
        frac = r.get("up_fraction_of_per_task_fedavg")
        lines.append(
            f"| {r['method']} | {r['setting']} | {_pm(r['mean_normalised'])} | {_pm(r['mean_acc'])} | {diff} | "
            f"{_kb(r['up_bytes_per_client_round'])} | "
            f"{'1/' + format(1 / frac, '.0f') if frac else '-'} | {r['up_bits_per_param_per_task']:.3f} | "
            f"{_kb(r['down_bytes_per_client_round'])} | {'-' if t is None else f'{t[0]:.3f}'} | "
            f"{'yes' if r['pareto'] else ''} | {_versus(r, both)} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the communication study and print (and optionally write) its table."""
    parser = argparse.ArgumentParser(prog="python -m matu_lib.communication_study", description=main.__doc__)
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--split", choices=("val", "test"), default="test")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument(
        "--only", nargs="+", default=None, metavar="SETTING", help="a subset of SETTINGS (float32 kept)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="runs folder (default: results/<preset> for test, results/<preset>-validation/communication)",
    )
    parser.add_argument("--results", type=Path, default=None, metavar="PATH.md", help="also write Markdown + JSON here")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    args = parser.parse_args(argv)
    from .presets import study_preset

    try:
        base = study_preset(args.preset, args.set, eval_split=args.split)
    except (KeyError, TypeError, ValueError) as err:
        print(f"error: {err.args[0] if err.args else err}", file=sys.stderr)
        return 2
    settings = dict(SETTINGS)
    if args.only:
        unknown = sorted(set(args.only) - set(settings))
        if unknown:
            print(f"error: unknown settings {unknown}; choose from {list(settings)}", file=sys.stderr)
            return 2
        settings = {k: v for k, v in settings.items() if k == "float32" or k in args.only}
    out = args.out or (
        Path("results") / args.preset
        if args.split == "test"
        else Path("results") / f"{args.preset}-validation" / "communication"
    )
    summary = run_study(base, args.seeds, out, settings, args.methods)
    if args.split == "val":
        summary["chosen"] = choose_setting(summary)
    text = format_study(summary, invocation("matu_lib.communication_study", argv))
    if "chosen" in summary:
        text += (
            "\nChosen on validation (smallest upload within 0.02 normalised of float32 MaTU): "
            f"**{summary['chosen']}**.\n"
        )
    return publish(text, summary, args.results)


if __name__ == "__main__":
    raise SystemExit(main())
