"""Where MaTU's accuracy goes: one unification at the end against a unification in every round.

    python -m matu_lib.unification_study --preset cpu --seeds 0 1 2 --set eval_split=val --set eval_every=5 \\
        --results PATH.md

MaTU never evaluates or trains from a task's own average: every model is ``lambda_t * (m_t * tau_u)`` of a
client's unified vector (with ``fill_dropped="model"``, the default, the coordinates ``m_t`` drops hold the
client's own last trained values instead of 0). Per-task FedAvg keeps each task's average as it is. The gap between
the two has two
possible sources, and this study separates them per seed, on the runs ``compare`` already made (same folders,
reused; missing runs are trained):

- **once**: per-task FedAvg's final per-task averages (read from its verified checkpoint), unified per client
  exactly as MaTU's server re-unifies (the run's elect / tie / magnitude / mask / rescaler options and scope),
  then evaluated. ``once - per-task FedAvg`` is what a single unification costs.
- **MaTU**: the same budget with a unification on the way up and on the way down in every round, so every
  round's training starts from a reconstruction. ``MaTU - once`` is what unifying in every round adds.
- **once, per-tensor rescalers**: the same unification with one rescaler per parameter tensor instead of one
  per task (``modulators.tensor_rescalers``): whether a richer rescaler would recover what one loses.

Reported per method: absolute and chance-corrected normalised accuracy (reference: individual fine-tuning of the
same seed and split), mean ± sd over seeds, paired differences on (seed, task) with bootstrap 95% intervals, and
the cosine between each reconstruction and the average it stands for.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .comparison import invocation, publish, seed_folder
from .federation import build_context, chance_levels, evaluate, run
from .federation import summarise as summarise_pairs
from .methods import METHODS, FedContext
from .modulators import reconstruct, tensor_rescalers, unify
from .presets import RunConfig, preset
from .results_folder import config_id, folder_config, load_checkpoint
from .stats import mean_sd, normalise, paired_difference, unlearnable

ROWS = ("per_task_fedavg", "once", "once_tensor", "matu")
LABELS = {
    "per_task_fedavg": "per-task FedAvg (no unification)",
    "once": "per-task FedAvg, unified once at the end",
    "once_tensor": "the same, one rescaler per tensor",
    "matu": "MaTU (unified up and down every round)",
}
DIFFERENCES = (
    ("once", "per_task_fedavg", "what one unification costs"),
    ("matu", "once", "what unifying in every round adds"),
    ("once_tensor", "once", "per-tensor rescalers against one per task"),
    ("matu", "per_task_fedavg", "MaTU against per-task FedAvg"),
)


def final_task_vectors(ctx: FedContext, folder: Path) -> dict[str, Tensor]:
    """Per-task FedAvg's per-task averages after its last round, from the run's verified checkpoint."""
    impl = METHODS["per_task_fedavg"](ctx)
    history, done = load_checkpoint(folder, impl, config_id(folder_config(ctx.cfg, "per_task_fedavg")))
    if done != ctx.cfg.rounds:
        raise ValueError(f"{folder} holds {done} of {ctx.cfg.rounds} rounds; finish the run first")
    return dict(impl.server.task_delta)


def tensor_sizes(ctx: FedContext) -> list[int]:
    """Entries of each parameter tensor of the encoder, in the flat task vector's order."""
    return [math.prod(shape) for _, shape in ctx.trainer.layout]


def unified_once(ctx: FedContext, vectors: dict[str, Tensor]) -> dict[str, dict]:
    """Re-unify ``vectors`` per client (or once for all tasks) with the run's MaTU options, as the server does.

    Returns, per variant (``once``, ``once_tensor``), the model of each (client, task) and its cosine with the
    average it reconstructs."""
    cfg = ctx.cfg
    groups = (
        [(c.client_id, tuple(c.tasks)) for c in ctx.clients]
        if cfg.unified_scope == "client"
        else [(None, tuple(ctx.tasks))]
    )
    sizes = tensor_sizes(ctx)
    out: dict[str, dict] = {"once": {}, "once_tensor": {}}
    by_group: dict = {}
    for key, tasks in groups:
        vecs = [vectors[t] for t in tasks]
        unified, masks, lams = unify(
            vecs,
            rule=cfg.elect_rule,
            tie=cfg.tie_rule,
            magnitude=cfg.magnitude,
            use_masks=cfg.use_masks,
            use_rescalers=cfg.use_rescalers,
        )
        for i, t in enumerate(tasks):
            per_tensor = (
                tensor_rescalers(vecs[i], masks[i], unified, sizes) if cfg.use_rescalers else torch.ones(len(sizes))
            )
            by_group[(key, t)] = (
                reconstruct(unified, masks[i], lams[i]),
                reconstruct(unified, masks[i], per_tensor, sizes),
            )
    for c in ctx.clients:
        for t in c.tasks:
            models = by_group[(c.client_id if cfg.unified_scope == "client" else None, t)]
            for name, model in zip(("once", "once_tensor"), models):
                cos = float(torch.nn.functional.cosine_similarity(model, vectors[t], dim=0))
                out[name][(c.client_id, t)] = (model, cos)
    return out


def study_seed(ctx: FedContext, folder: str | Path, log: Callable[[str], None] = print) -> dict:
    """One seed: individual, per-task FedAvg and MaTU in ``folder`` (compare's layout; reused), and the two
    once-unified variants of per-task FedAvg's final averages, evaluated on ``cfg.eval_split``."""
    folder = Path(folder)
    reference = run(ctx, "individual", folder / "individual", resume=True, log=log).final["acc"]
    acc = {m: run(ctx, m, folder / m, resume=True, log=log).final["acc"] for m in ("per_task_fedavg", "matu")}
    cosine = {}
    for name, models in unified_once(ctx, final_task_vectors(ctx, folder / "per_task_fedavg")).items():
        # evaluated as a run's models are: per (client, task), a reconstruction shared by clients once
        per_pair = evaluate(ctx, {key: model for key, (model, _) in models.items()}, ctx.cfg.eval_split)
        acc[name] = summarise_pairs(per_pair, None)["acc"]
        cosine[name] = summarise_pairs({f"{k}/{t}": cos for (k, t), (_, cos) in models.items()}, None)["acc"]
        log(f"{name}: mean acc {np.mean(list(acc[name].values())):.4f}")
    return {"reference": reference, "acc": acc, "chance": chance_levels(ctx), "cosine": cosine}


def summarise(per_seed: dict[int, dict], base: RunConfig, n_boot: int = 10_000) -> dict:
    """Mean ± sd per row over seeds, the paired differences of ``DIFFERENCES``, mean reconstruction cosines."""
    seeds = sorted(per_seed)
    first = per_seed[seeds[0]]
    tasks, chance = sorted(first["reference"]), first["chance"]
    flagged = sorted(t for t in tasks if unlearnable([per_seed[s]["reference"][t] for s in seeds], chance[t]))
    learnable = [t for t in tasks if t not in flagged]
    grids = {}
    for row in ROWS:
        acc = np.array([[per_seed[s]["acc"][row][t] for t in tasks] for s in seeds])
        norm = np.array(
            [
                [
                    normalise(per_seed[s]["acc"][row], per_seed[s]["reference"], chance, flagged)["normalised"][t]
                    for t in learnable
                ]
                for s in seeds
            ]
        )
        grids[row] = acc, norm
    rows = [
        {
            "row": r,
            "label": LABELS[r],
            "mean_acc": mean_sd(grids[r][0].mean(axis=1)),
            "mean_normalised": mean_sd(grids[r][1].mean(axis=1)),
            "cosine": (
                mean_sd([np.mean(list(per_seed[s]["cosine"][r].values())) for s in seeds])
                if r in first["cosine"]
                else None
            ),
        }
        for r in ROWS
    ]
    diffs = [
        {
            "a": a,
            "b": b,
            "what": what,
            "acc": paired_difference(grids[a][0], grids[b][0], n_boot),
            "normalised": paired_difference(grids[a][1], grids[b][1], n_boot),
        }
        for a, b, what in DIFFERENCES
    ]
    return {
        "preset": base.preset,
        "split": base.eval_split,
        "rounds": base.rounds,
        "seeds": seeds,
        "tasks": tasks,
        "flagged": flagged,
        "rows": rows,
        "differences": diffs,
        "per_seed": {str(s): {"acc": per_seed[s]["acc"], "cosine": per_seed[s]["cosine"]} for s in seeds},
        "config": {k: v for k, v in json.loads(json.dumps(base.identity())).items() if k != "seed"},
    }


def run_study(
    base: RunConfig, seeds: Iterable[int], out: str | Path, n_boot: int = 10_000, log: Callable[[str], None] = print
) -> dict:
    """``study_seed`` once per seed, in ``out/seed<s>`` (where ``compare`` puts that seed's runs)."""
    from dataclasses import replace

    per_seed = {
        int(s): study_seed(build_context(replace(base, seed=int(s)), log=log), seed_folder(out, int(s)), log)
        for s in seeds
    }
    return summarise(per_seed, base, n_boot)


def _ci(d: dict) -> str:
    return f"{d['mean']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]"


def format_study(summary: dict, command: str | None = None) -> str:
    seeds = ", ".join(map(str, summary["seeds"]))
    lines = [
        f"# One unification against one per round: `{summary['preset']}` preset, {summary['rounds']} rounds, "
        f"{summary['split']} split, seeds {seeds}",
        "",
    ]
    if command:
        lines += [f"Written by `{command}`.", ""]
    fill = summary["config"].get("fill_dropped", "none")  # absent: a run at the field's earlier value
    fill_note = (
        ": where a mask drops a coordinate, its model holds the client's own last trained value, so *MaTU - "
        "once* also holds what that fill recovers."
        if fill == "model"
        else ": its model is the modulated vector as it is."
    )
    lines += [
        "Mean ± sd over seeds. **abs**: absolute accuracy; **normalised**: (acc - chance) / (individual - chance) "
        f"per task, averaged over the learnable tasks (flagged: {', '.join(summary['flagged']) or 'none'}). "
        "**cosine**: between each (client, task) reconstruction and the per-task average it stands for, averaged. "
        "The once-unified rows re-unify per-task FedAvg's final averages per client with the run's MaTU options. "
        f"MaTU's `fill_dropped` is `{fill}`{fill_note}",
        "",
        "| | abs | normalised | cosine to the average |",
        "|---|---|---|---|",
    ]
    for r in summary["rows"]:
        cos = (
            "1 (itself)"
            if r["row"] == "per_task_fedavg"
            else "-"
            if r["cosine"] is None
            else f"{r['cosine'][0]:.3f} ± {r['cosine'][1]:.3f}"
        )
        lines.append(
            f"| {r['label']} | {r['mean_acc'][0]:.3f} ± {r['mean_acc'][1]:.3f} | "
            f"{r['mean_normalised'][0]:.3f} ± {r['mean_normalised'][1]:.3f} | {cos} |"
        )
    lines += [
        "",
        "Paired on (seed, task); brackets: 95% bootstrap interval (seeds and tasks resampled).",
        "",
        "| difference | what it measures | abs | normalised |",
        "|---|---|---|---|",
    ]
    for d in summary["differences"]:
        lines.append(
            f"| {LABELS[d['a']]} - {LABELS[d['b']]} | {d['what']} | {_ci(d['acc'])} | {_ci(d['normalised'])} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the unification study over seeds and print (and optionally write) its table."""
    from .presets import default_folder, parse_overrides

    parser = argparse.ArgumentParser(prog="python -m matu_lib.unification_study", description=main.__doc__)
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="RunConfig overrides, as for `compare` (the same --set finds compare's runs)",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="runs folder (default: compare's, results/<preset>[/...])"
    )
    parser.add_argument("--results", type=Path, default=None, metavar="PATH.md", help="also write Markdown + JSON here")
    args = parser.parse_args(argv)
    try:
        overrides = parse_overrides(args.set)
        if "seed" in overrides:
            raise ValueError("set the seeds with --seeds, not --set seed=...")
        if len(set(args.seeds)) != len(args.seeds):
            raise ValueError(f"--seeds must be distinct, got {args.seeds}")
        if args.results is not None and args.results.suffix != ".md":
            raise ValueError(f"--results expects a path ending in .md (the JSON goes beside it), got {args.results}")
        base = preset(args.preset, **overrides)
    except (KeyError, TypeError, ValueError) as err:
        print(f"error: {err.args[0] if err.args else err}", file=sys.stderr)
        return 2
    summary = run_study(base, args.seeds, args.out or default_folder(args.preset, overrides))
    text = format_study(summary, invocation("matu_lib.unification_study", argv))
    return publish(text, summary, args.results)


if __name__ == "__main__":
    raise SystemExit(main())
