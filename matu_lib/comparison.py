"""Comparisons: several methods on identical clients, splits and seeds, and the results files they write.

    table = compare(ctx, ["individual", "matu", "fedavg"], out="results/cpu")
    summary = compare_seeds(preset("cpu"), [0, 1, 2], out="results/cpu")  # seed0/ seed1/ seed2/ summary.md

``compare`` runs each method through ``tuning.run_method``, so ``cfg.tune_baselines`` tunes the baselines'
grids on validation first.
"""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .federation import NORMALISED_KEYS, build_context, chance_levels, summarise
from .methods import FedContext
from .presets import RunConfig
from .results_folder import atomic_write
from .tuning import run_method

# ``individual_converged`` (up to 15 times ``individual``'s training) is opt-in: ``--methods`` names it.
DEFAULT_COMPARISON = (
    "zero_shot",
    "individual",
    "local",
    "matu",
    "fedavg",
    "fedprox",
    "per_task_fedavg",
    "matfl_grouping",
    "task_arithmetic",
    "ties",
    "tall_masks",
    "consensus",
    "emr",
)


def compare(
    ctx: FedContext,
    methods: tuple[str, ...] | list[str] = DEFAULT_COMPARISON,
    out: str | Path | None = None,
    resume: bool = True,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Run several methods on the same context; ``individual`` runs first and is the normalisation reference."""
    methods = list(methods)
    if "individual" not in methods:
        methods.insert(0, "individual")
    methods.sort(key=lambda m: m != "individual")
    rows, reference, chance = [], None, chance_levels(ctx)
    for name in methods:
        res = run_method(
            ctx,
            name,
            Path(out) / name if out else None,
            reference=reference,
            resume=resume,
            overwrite=overwrite,
            log=log,
        )
        if name == "individual":
            reference = res.final["acc"]
        if reference is not None:  # also for finished runs reused from a folder written without a reference
            per_task = summarise({f"0/{t}": a for t, a in res.final["acc"].items()}, reference, chance)
            res.final |= {k: per_task[k] for k in NORMALISED_KEYS}
        per_task_keys = ("acc", "normalised", "ratio")
        rows.append(
            {
                "method": name,
                **{k: v for k, v in res.final.items() if k not in per_task_keys},
                **{k: res.final.get(k) for k in per_task_keys},
                "chance": chance,
            }
        )
    if out is not None:
        atomic_write(Path(out) / "summary.json", json.dumps(rows, indent=1))
        atomic_write(Path(out) / "table.md", format_table(rows))
    return rows


def format_table(rows: list[dict]) -> str:
    """A Markdown table of one seed: absolute mean accuracy, normalised (chance-corrected) and ratio, bytes, time."""
    head = (
        "| method | mean acc (abs) | mean normalised | mean ratio | upload/round | download/round | server state "
        "| time |\n|---|---|---|---|---|---|---|---|\n"
    )
    nan = float("nan")
    lines = [
        f"| {r['method']} | {r['mean_acc']:.3f} | {r.get('mean_normalised', nan):.3f} | "
        f"{r.get('mean_ratio', nan):.3f} | {_mb(r['bytes_up_per_round'])} | {_mb(r['bytes_down_per_round'])} | "
        f"{_mb(r['server_state_bytes'])} | {r['seconds_total']:.0f}s |"
        for r in rows
    ]
    return head + "\n".join(lines) + "\n"


def _mb(x: float) -> str:
    return f"{x / 1e6:.2f} MB"


# ----------------------------------------------------------------------------------- over seeds


def seed_folder(out: str | Path, seed: int) -> Path:
    """Where one seed's comparison lives under a multi-seed results folder (runs of two seeds never collide)."""
    return Path(out) / f"seed{seed}"


def compare_seeds(
    cfg: RunConfig,
    seeds: list[int] | tuple[int, ...],
    methods: tuple[str, ...] | list[str] = DEFAULT_COMPARISON,
    out: str | Path | None = None,
    resume: bool = True,
    overwrite: bool = False,
    n_boot: int = 10_000,
    scheme: str = "crossed",
    log: Callable[[str], None] = print,
    folders: Callable[[RunConfig], Path] | None = None,
) -> dict:
    """``compare`` once per seed (into ``out/seed<s>``, each resumable), then ``stats.aggregate_seeds``.

    ``folders`` maps a seed's config to its comparison folder instead (the notebooks use ``run_folder``, so
    the seed that notebooks 02 and 06 read is the same run, not a second copy).

    Writes ``out/summary.json`` and ``out/summary.md`` (``format_seed_summary``); returns the summary, with
    ``sentences`` (``stats.losses_in_words``) and ``config`` (the run config without its seed) added.
    """
    from dataclasses import replace

    from .costs import add_costs
    from .stats import aggregate_seeds, losses_in_words

    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct and at least one, got {seeds}")
    rows_by_seed, seed_folders = {}, {}
    for s in seeds:
        seed_cfg = replace(cfg, seed=s)
        folder = folders(seed_cfg) if folders is not None else seed_folder(out, s) if out is not None else None
        seed_folders[s] = folder
        rows_by_seed[s] = compare(
            build_context(seed_cfg, log=log), methods, folder, resume=resume, overwrite=overwrite, log=log
        )
    summary = aggregate_seeds(rows_by_seed, rows_by_seed[seeds[0]][0]["chance"], n_boot=n_boot, scheme=scheme)
    summary["sentences"] = losses_in_words(summary)
    summary["config"] = {k: v for k, v in json.loads(json.dumps(cfg.to_dict())).items() if k != "seed"}
    if all(f is not None for f in seed_folders.values()):  # bytes, rounds and compute over the run (matu_lib.costs)
        add_costs(summary, seed_folders)
    if out is not None:
        write_summary(summary, Path(out) / "summary.md")
    return summary


def write_summary(summary: dict, path: str | Path, command: str | None = None) -> tuple[Path, Path]:
    """Write ``format_seed_summary`` to ``path`` (.md) and the numbers beside it (.json, NaN as null)."""
    return write_results(path, format_seed_summary(summary, command), summary | {"command": command})


def write_results(path: str | Path, text: str, numbers: dict) -> tuple[Path, Path]:
    """A results file: ``text`` to ``path`` (.md) and ``numbers`` beside it as strict JSON (NaN as null), each
    written whole or not at all, so a killed command never leaves half a committed results file."""
    path = Path(path)
    if path.suffix != ".md":
        raise ValueError(f"the results path must end in .md (the JSON goes beside it), got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, text)
    atomic_write(
        path.with_suffix(".json"), json.dumps(_json_safe(json.loads(json.dumps(numbers, default=float))), indent=1)
    )
    return path, path.with_suffix(".json")


def invocation(module: str, argv: Sequence[str] | None) -> str:
    """The command line a results file names as its maker (``argv`` None: this process's arguments)."""
    return f"python -m {module} " + " ".join(map(shlex.quote, sys.argv[1:] if argv is None else argv))


def publish(text: str, numbers: dict, path: Path | None) -> int:
    """A study command's ending: print its table, write it (``write_results``) when ``--results`` names a file."""
    print(text)
    if path is not None:
        write_results(path, text, numbers)
        print(f"results file: {path}")
    return 0


def _json_safe(obj):
    """NaN -> None and tuples -> lists, so the file is strict JSON that any reader accepts."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float) and obj != obj:
        return None
    return obj


def _pm(mean_sd: tuple[float, float] | list[float], digits: int = 3) -> str:
    mean, sd = mean_sd
    if mean != mean:
        return "-"
    return f"{mean:.{digits}f}" + ("" if sd != sd else f" ± {sd:.{digits}f}")


def format_seed_summary(summary: dict, command: str | None = None) -> str:
    """Markdown: headline table (mean ± sd, paired differences), sentences, flagged tasks, per-task tables.

    With one seed nothing speaks of a spread: no sd is shown, the flagging rule is stated without one, and the
    header says "mean over 1 seed (no spread)"."""
    from .costs import cost_section
    from .stats import display_name, flag_rule, over_seeds

    seeds, target, ref = summary["seeds"], summary["target"], summary["reference"]
    cfg = summary.get("config", {})
    methods, diffs = summary["methods"], summary["differences"]
    any_diff = next(iter(diffs.values()), None)
    t_name = display_name(target)
    lines = [
        f"# {t_name} against the baselines: `{cfg.get('preset', '?')}` preset, "
        f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}",
        "",
    ]
    if command:
        lines += [f"Written by `{command}`.", ""]
    spread = over_seeds(len(seeds))
    lines += [
        f"{spread[0].upper()}{spread[1:]} ({cfg.get('eval_split', '?')} split, "
        f"{len(summary['tasks'])} tasks). **Normalised** = (acc - chance) / ({ref} - chance) per task, chance = "
        f"1 / classes, averaged over the learnable tasks; *all tasks* keeps the flagged ones; **ratio** = acc / "
        f"{ref} (the earlier measure), learnable tasks."
        + (
            f" *vs converged*: normalised the same way against `{summary['converged_reference']}` (per-task "
            "fine-tuning trained until validation accuracy stops improving)."
            if summary.get("converged_reference")
            else ""
        ),
        "",
    ]
    conv = bool(summary.get("converged_reference"))
    head = (
        "| method | mean acc (abs) | mean normalised | normalised, all tasks | ratio | "
        + ("normalised vs converged | " if conv else "")
        + f"{t_name} - method, abs | {t_name} - method, normalised | upload/round | server state |"
    )
    lines += [head, "|" + "---|" * (10 if conv else 9)]

    def diff_cell(m: str, key: str) -> str:
        if m not in diffs:
            return "-"
        d = diffs[m][key]
        return f"{d['mean']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]"

    for m, row in methods.items():
        name = f"**{m}**" if m == target else (f"{m} (reference)" if m == ref else m)
        up = _mb(row["bytes_up_per_round"]) if "bytes_up_per_round" in row else "-"
        state = _mb(row["server_state_bytes"]) if "server_state_bytes" in row else "-"
        lines.append(
            f"| {name} | {_pm(row['mean_acc'])} | {_pm(row['mean_normalised'])} | "
            f"{_pm(row['mean_normalised_all'])} | {_pm(row['mean_ratio'])} | "
            + (f"{_pm(row['mean_normalised_converged'])} | " if conv else "")
            + f"{diff_cell(m, 'acc')} | "
            f"{diff_cell(m, 'normalised')} | {up} | {state} |"
        )
    lines.append("")
    if any_diff is not None:
        a = any_diff["acc"]
        lines += [
            f"Differences are {t_name} - method, paired on (seed, task), averaged; brackets: "
            f"{round(100 * a['level'])}% percentile bootstrap interval ({a['n_boot']} resamples, scheme "
            + (
                "`crossed`: seeds and tasks resampled independently with replacement)."
                if len(seeds) > 1
                else "`crossed` with one seed: tasks resampled with replacement, so seed-to-seed variation is not "
                "in the interval)."
            )
            if a["scheme"] == "crossed"
            else f"Differences are {t_name} - method, paired on (seed, task); brackets: {round(100 * a['level'])}% "
            f"bootstrap interval ({a['n_boot']} resamples, scheme `{a['scheme']}`).",
            "",
        ]
    sentences = summary.get("sentences") or []
    if any_diff is not None:
        lines += (
            ["In words:", ""]
            + (
                [f"- {s}" for s in sentences]
                or [
                    f"- {t_name} is not beaten by any baseline on either measure (means over "
                    f"{len(seeds)} seed{'s' if len(seeds) > 1 else ''})."
                ]
            )
            + [""]
        )
    chance, ref_acc = summary["chance"], methods[ref]["acc"]
    if summary["flagged"]:
        flagged = ", ".join(f"{t} (chance {chance[t]:.3f}, {ref} {_pm(ref_acc[t])})" for t in summary["flagged"])
        lines += [
            f"Flagged as not learned ({flag_rule(len(seeds), ref, summary['margin'])}), left out of "
            f"the normalised and ratio means: {flagged}.",
            "",
        ]
    else:
        lines += [f"No task flagged (the rule: {flag_rule(len(seeds), ref, summary['margin'])}).", ""]
    lines += cost_section(summary)  # "Cost over the run" (matu_lib.costs), when the summary has costs
    for key, title in (("acc", "absolute accuracy"), ("normalised", "normalised accuracy")):
        lines += [
            f"## Per task: {title} ({over_seeds(len(seeds))})",
            "",
            "| task | chance | " + " | ".join(methods) + " |",
            "|" + "---|" * (len(methods) + 2),
        ]
        for t in summary["tasks"]:
            mark = " (flagged)" if t in summary["flagged"] else ""
            lines.append(
                f"| {t}{mark} | {chance[t]:.3f} | " + " | ".join(_pm(methods[m][key][t], 2) for m in methods) + " |"
            )
        lines.append("")
    return "\n".join(lines)
