"""Does fine-tuning learn the suite? Backbones compared task by task, before any federation.

    python -m matu_lib.substrate_study --preset cpu --seeds 0 1 2 --models matu-tiny matu-lite0 \\
        --results data/results/cpu-substrate.md

A federated lesson is only worth teaching on an encoder that learns its tasks when fine-tuned alone. For each
backbone, seed and task of the preset this measures, on the preset's own training data (the pooled shards,
``max_train_per_task`` images):

- **chance** (1 / classes) and **zero-shot** accuracy of the frozen encoder with its frozen head;
- **individual**: per-task fine-tuning at the preset's budget (the ``individual`` method's steps: rounds x local
  steps x holders), the learning rate chosen per backbone from ``LR_GRID`` by mean validation accuracy over tasks
  and seeds (every backbone on the same grid);
- **linear probes** (logistic regression, C chosen on validation from ``C_GRID``) on the frozen encoder's image
  embedding, on a packaged trunk's pooled features (before the projection the alignment trained; ViTs have no
  such separate trunk) and on the raw pixels: whether the pretrained features carry more than the pixels do.

Every accuracy is absolute top-1 in [0, 1]; test splits are reported, validation splits choose. Seconds per
individual fine-tuning run are measured in the same process, so the backbones' costs compare as a ratio.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from .comparison import invocation, publish
from .federation import build_context, chance_levels
from .methods import FedContext
from .presets import preset
from .stats import mean_sd
from .training import LocalTrainer, derive_seed

LR_GRID = (5e-4, 1e-3, 2e-3)
C_GRID = (0.01, 0.1, 1.0, 10.0)
# What a task needs to count as learnt by per-task fine-tuning (absolute test accuracy, mean over seeds).
OVER_ZERO_SHOT, OVER_CHANCE = 0.10, 0.20


def probe(
    train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray]
) -> tuple[float, float]:
    """(validation, test) accuracy of a standardised logistic regression whose C is chosen on validation."""
    scaler = StandardScaler().fit(train[0])
    xs = [scaler.transform(x) for x in (train[0], val[0], test[0])]
    best = None
    for c in C_GRID:
        model = LogisticRegression(C=c, max_iter=2000).fit(xs[0], train[1])
        score = model.score(xs[1], val[1])
        if best is None or score > best[0]:
            best = (score, model)
    return float(best[0]), float(best[1].score(xs[2], test[1]))


@torch.no_grad()
def embeddings(trainer: LocalTrainer, task: str, images: torch.Tensor) -> np.ndarray:
    """The frozen (pretrained) encoder's image embedding, before normalisation: what its head reads."""
    model = trainer.model(None, task).eval()
    prepared = model.prepare_split(images)
    return torch.cat([model.visual(prepared[i : i + 512]) for i in range(0, len(prepared), 512)]).float().numpy()


@torch.no_grad()
def trunk_features(trainer: LocalTrainer, task: str, images: torch.Tensor) -> np.ndarray | None:
    """A packaged trunk's pooled features, before the projection (``TunedTrunk.features``); None for a ViT."""
    model = trainer.model(None, task).eval()
    features = getattr(model.visual, "features", None)
    if features is None:
        return None
    prepared = model.prepare_split(images)
    return torch.cat([features(prepared[i : i + 512]) for i in range(0, len(prepared), 512)]).float().numpy()


def pixels(images: torch.Tensor) -> np.ndarray:
    return images.reshape(len(images), -1).float().numpy() / 255.0


def _labels(split) -> np.ndarray:
    return split[1].numpy()


def probes(ctx: FedContext, task: str) -> dict[str, float]:
    """Chance, zero-shot and the three linear probes of one task (test accuracy; C chosen on validation).

    What the frozen encoder offers before any fine-tuning: if a probe on its features does no better than one on
    raw pixels, fine-tuning starts from features that carry nothing the task can use.
    """
    base, splits = ctx.trainer, (ctx.train[task], ctx.val[task], ctx.test[task])
    labels = [_labels(s) for s in splits]
    row = {
        "chance": chance_levels(ctx)[task],
        "zero_shot": base.evaluate(None, task, splits[2], ctx.cfg.eval_batch_size),
    }
    kinds = {
        "features": [embeddings(base, task, s[0]) for s in splits],
        "trunk": [trunk_features(base, task, s[0]) for s in splits],
        "pixels": [pixels(s[0]) for s in splits],
    }
    for kind, feats in kinds.items():
        row[f"probe_{kind}_val"], row[f"probe_{kind}"] = (
            probe(*zip(feats, labels)) if feats[0] is not None else (math.nan, math.nan)
        )
    return row


def measure(ctx: FedContext, lrs: Sequence[float], log: Callable[[str], None] = print) -> dict:
    """Per task: chance, zero-shot, the probes, and individual fine-tuning at each learning rate (val and test)."""
    cfg, base = ctx.cfg, ctx.trainer
    out: dict[str, dict] = {}
    seconds: list[float] = []
    for t in ctx.tasks:
        train, val, test = ctx.train[t], ctx.val[t], ctx.test[t]
        row = probes(ctx, t)
        steps = cfg.rounds * cfg.local_steps * len(ctx.holders(t))
        row["steps"], row["individual"] = steps, {}
        for lr in lrs:
            trainer = LocalTrainer(base.backbone, base.heads, dataclasses.replace(base.finetune_cfg, lr=lr))
            start = time.perf_counter()
            delta = trainer.train_task(None, t, train, steps, derive_seed(cfg.seed, "individual", t))
            seconds.append(time.perf_counter() - start)
            row["individual"][str(lr)] = {
                "val": trainer.evaluate(delta, t, val, cfg.eval_batch_size),
                "test": trainer.evaluate(delta, t, test, cfg.eval_batch_size),
            }
        log(
            f"  {cfg.model} seed {cfg.seed} {t}: zero-shot {row['zero_shot']:.3f}, probe features "
            f"{row['probe_features']:.3f} / pixels {row['probe_pixels']:.3f}, individual "
            + ", ".join(f"{lr}: {v['val']:.3f}" for lr, v in row["individual"].items())
            + " (val)"
        )
        out[t] = row
    return {"tasks": out, "seconds_per_run": float(np.median(seconds)), "encoder_params": base.n_params}


def summarise(runs: dict[str, dict[int, dict]]) -> dict:
    """Per backbone: the learning rate chosen on validation and per-task means over seeds at that rate."""
    summary = {}
    for model, by_seed in runs.items():
        seeds = sorted(by_seed)
        tasks = list(by_seed[seeds[0]]["tasks"])
        lrs = list(by_seed[seeds[0]]["tasks"][tasks[0]]["individual"])
        val = {
            lr: float(np.mean([by_seed[s]["tasks"][t]["individual"][lr]["val"] for s in seeds for t in tasks]))
            for lr in lrs
        }
        lr = max(lrs, key=lambda k: val[k])
        per_task = {}
        for t in tasks:
            rows = [by_seed[s]["tasks"][t] for s in seeds]
            entry = {
                key: mean_sd(r.get(key, math.nan) for r in rows)
                for key in ("chance", "zero_shot", "probe_features", "probe_trunk", "probe_pixels")
            }
            entry["individual"] = mean_sd(r["individual"][lr]["test"] for r in rows)
            ind, zs, ch = entry["individual"][0], entry["zero_shot"][0], entry["chance"][0]
            entry["learnt"] = bool(ind >= zs + OVER_ZERO_SHOT and ind >= ch + OVER_CHANCE)
            per_task[t] = entry
        means = {
            key: mean_sd(
                np.mean(
                    [
                        by_seed[s]["tasks"][t].get(key, math.nan)
                        if key != "individual"
                        else by_seed[s]["tasks"][t]["individual"][lr]["test"]
                        for t in tasks
                    ]
                )
                for s in seeds
            )
            for key in ("chance", "zero_shot", "probe_features", "probe_trunk", "probe_pixels", "individual")
        }
        summary[model] = {
            "lr": float(lr),
            "val_by_lr": val,
            "tasks": per_task,
            "means": means,
            "learnt": sum(e["learnt"] for e in per_task.values()),
            "n_tasks": len(tasks),
            "seconds_per_run": float(np.median([by_seed[s]["seconds_per_run"] for s in seeds])),
            "encoder_params": by_seed[seeds[0]]["encoder_params"],
            "seeds": seeds,
        }
    return summary


def _pm(value: tuple[float, float]) -> str:
    mean, sd = value
    if math.isnan(mean):
        return "-"
    return f"{mean:.3f}" if math.isnan(sd) else f"{mean:.3f} ± {sd:.3f}"


def format_summary(summary: dict, preset_name: str, command: str) -> str:
    models = list(summary)
    first = summary[models[0]]
    lines = [
        f"# Backbones on the `{preset_name}` tasks: does per-task fine-tuning learn them?",
        "",
        f"Written by `{command}`.",
        "",
        (
            f"Test splits, seeds {', '.join(map(str, first['seeds']))}; absolute top-1 accuracy, mean ± sd over "
            "seeds (each seed is its own task sample and training order). *individual*: per-task fine-tuning on "
            "the pooled training data at the preset's budget, learning rate chosen per backbone on validation "
            f"from {[float(lr) for lr in first['val_by_lr']]}. Probes: logistic regression on the frozen encoder's "
            "image embedding, on a packaged trunk's pooled features before the projection (*trunk*; `-` for a ViT, "
            "which has no separate pretrained trunk) or on the raw pixels, C chosen on validation from "
            f"{list(C_GRID)}. A task counts as "
            f"*learnt* when its individual accuracy is at least zero-shot + {OVER_ZERO_SHOT:.2f} and chance + "
            f"{OVER_CHANCE:.2f}."
        ),
        "",
        (
            "| backbone | fine-tuned parameters | lr (val) | seconds per individual run | chance | zero-shot | "
            "probe, features | probe, trunk | probe, pixels | individual | tasks learnt |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base_seconds = first["seconds_per_run"]
    for m in models:
        s = summary[m]
        lines.append(
            f"| `{m}` | {s['encoder_params']:,} | {s['lr']:g} | {s['seconds_per_run']:.1f} "
            f"({s['seconds_per_run'] / base_seconds:.2f}x) | {_pm(s['means']['chance'])} | "
            f"{_pm(s['means']['zero_shot'])} | {_pm(s['means']['probe_features'])} | "
            f"{_pm(s['means']['probe_trunk'])} | {_pm(s['means']['probe_pixels'])} | {_pm(s['means']['individual'])} | "
            f"{s['learnt']} of {s['n_tasks']} |"
        )
    lines += [
        "",
        "Validation accuracy of *individual* by learning rate (mean over tasks and seeds): "
        + "; ".join(
            f"`{m}` " + ", ".join(f"{lr}: {v:.3f}" for lr, v in summary[m]["val_by_lr"].items()) for m in models
        )
        + ".",
    ]
    for m in models:
        rates = sorted(float(lr) for lr in summary[m]["val_by_lr"])
        if len(rates) > 1 and summary[m]["lr"] in (rates[0], rates[-1]):
            side = "smallest" if summary[m]["lr"] == rates[0] else "largest"
            lines.append(f"`{m}`'s chosen rate is the {side} of the grid: a rate beyond it was not tried.")
    lines.append("")
    for m in models:
        s = summary[m]
        lines += [
            f"## `{m}` by task",
            "",
            "| task | chance | zero-shot | probe, features | probe, trunk | probe, pixels | individual | learnt |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for t, e in s["tasks"].items():
            lines.append(
                f"| {t} | {e['chance'][0]:.3f} | {_pm(e['zero_shot'])} | {_pm(e['probe_features'])} | "
                f"{_pm(e['probe_trunk'])} | {_pm(e['probe_pixels'])} | {_pm(e['individual'])} | "
                f"{'yes' if e['learnt'] else '**no**'} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--models", nargs="+", default=["matu-tiny", "matu-lite0"])
    parser.add_argument("--lrs", type=float, nargs="+", default=list(LR_GRID))
    parser.add_argument("--results", type=Path, default=None, help="write the table (.md) and numbers (.json)")
    parser.add_argument(
        "--reformat",
        type=Path,
        default=None,
        metavar="JSON",
        help="rewrite the table from a results file's numbers instead of measuring again",
    )
    args = parser.parse_args(argv)
    if args.reformat is not None:
        try:
            saved = json.loads(args.reformat.read_text())
            runs = {m: {int(seed): run for seed, run in by_seed.items()} for m, by_seed in saved["runs"].items()}
            command = saved["command"]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            parser.error(f"--reformat {args.reformat}: not a substrate study's numbers ({type(err).__name__}: {err})")
        return publish(
            format_summary(summarise(runs), saved.get("preset", args.preset), command),
            {**saved, "summary": summarise(runs)},
            args.results,
        )
    if any(s < 0 for s in args.seeds):
        parser.error(f"--seeds must be >= 0, got {args.seeds}")
    runs: dict[str, dict[int, dict]] = {}
    for model in args.models:
        for seed in args.seeds:
            ctx = build_context(preset(args.preset, model=model, seed=seed), log=print)
            runs.setdefault(model, {})[seed] = measure(ctx, args.lrs)
    summary = summarise(runs)
    command = invocation("matu_lib.substrate_study", argv)
    return publish(
        format_summary(summary, args.preset, command),
        {"command": command, "preset": args.preset, "summary": summary, "runs": runs},
        args.results,
    )


if __name__ == "__main__":
    raise SystemExit(main())
