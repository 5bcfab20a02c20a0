"""What each method costs over a whole run: bytes up and down, synchronisation rounds, client compute, server.

Accuracy alone does not say why one would pick MaTU: one-shot TALL masks is close to it with a single exchange,
and per-task FedAvg matches it while sending more and keeping a model per task on the server. This module reads
finished run folders (``config.json`` + ``metrics.json``) and counts, per method and seed:

- bytes: the serialised bytes every round recorded, summed over the run, up, down and both;
- rounds: synchronisation points (0 for a method that never communicates, 1 for a one-shot merge);
- client compute as optimiser steps, from the config and the method's budget rule (``STEP_RULES``), and the
  images those steps see (``steps * batch_size``; a step on a shard smaller than the batch sees the whole
  shard, so this is an upper bound). Wall seconds are not a fair compute measure here: runs shared a machine,
  and the one-shot mergers reuse the local training of ``local`` in the same comparison, so their recorded
  seconds leave that training out. They are kept (``wall_seconds``) but not compared;
- the server: bytes it keeps between rounds and the measured seconds of its half of each round
  (``serve_round``). One-shot merging happens inside its single round and is not timed apart (None).

``cost_section`` writes the "Cost over the run" section of a comparison's results file from a
``stats.aggregate_seeds`` summary with ``costs`` added, and ``costs_in_words`` the sentences that answer
"MaTU, or TALL masks / per-task FedAvg?" from those numbers alone.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

# How many client optimiser steps each method spends (``methods.py``'s budget rule, written out per method):
#   per_round_pair: each round, every sampled client trains each of its tasks ``local_steps`` steps (MaTU and
#                   per-task FedAvg per task; FedAvg-like methods ``local_steps * n_tasks`` multitask steps);
#   per_pair:       once, every client trains each of its tasks ``rounds * local_steps`` steps (local, and the
#                   one-shot mergers, which merge those local vectors);
#   pooled:         once, every task on the pooled data of its holders, ``rounds * local_steps * n_holders``
#                   steps (individual: the same total as per_pair, without federation);
#   converged:      every budget tried on validation (``individual_converged``, from the run's info);
#   none:           no training (zero-shot).
STEP_RULES: dict[str, str] = {
    "matu": "per_round_pair",
    "per_task_fedavg": "per_round_pair",
    "fedavg": "per_round_pair",
    "fedprox": "per_round_pair",
    "matfl_grouping": "per_round_pair",
    "local": "per_pair",
    "task_arithmetic": "per_pair",
    "ties": "per_pair",
    "tall_masks": "per_pair",
    "consensus": "per_pair",
    "emr": "per_pair",
    "individual": "pooled",
    "individual_converged": "converged",
    "zero_shot": "none",
}
ONE_SHOT = ("task_arithmetic", "ties", "tall_masks", "consensus", "emr")  # one upload, one download, no rounds
ITERATIVE = ("matu", "per_task_fedavg", "fedavg", "fedprox", "matfl_grouping")


@dataclass
class RunCost:
    """One finished run's cost. ``server_seconds`` is None where the server's work is not timed apart."""

    method: str
    seed: int
    bytes_up: int
    bytes_down: int
    rounds: int
    steps: int
    images: int
    server_state_bytes: int
    server_seconds: float | None
    wall_seconds: float
    tuned: bool  # a baseline tuned on validation also trained one run per grid value, not counted in ``steps``

    @property
    def bytes_total(self) -> int:
        return self.bytes_up + self.bytes_down


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except OSError:
        raise FileNotFoundError(
            f"{path} is missing; a run folder needs config.json and metrics.json of a finished run"
        ) from None
    except ValueError:
        raise ValueError(f"{path} is not valid JSON; rerun that method or restore the file") from None


def holdings(history: Sequence[Mapping]) -> dict[int, int]:
    """Tasks per client, from the ``client/task`` keys of an evaluated round (every run evaluates its last)."""
    for entry in reversed(history):
        if entry.get("acc_clients"):
            counts: dict[int, int] = {}
            for key in entry["acc_clients"]:
                k = int(key.split("/", 1)[0])
                counts[k] = counts.get(k, 0) + 1
            return counts
    raise ValueError("no evaluated round in the history: cannot tell which client holds which task")


def client_steps(method: str, config: Mapping, history: Sequence[Mapping]) -> int:
    """Client optimiser steps of one run by its method's budget rule (``STEP_RULES``)."""
    if method not in STEP_RULES:
        raise ValueError(f"no budget rule for method {method!r}; known: {sorted(STEP_RULES)}")
    rule = STEP_RULES[method]
    if rule == "none":
        return 0
    if rule == "converged":
        choice = history[-1].get("info", {}).get("steps_chosen_on_val", {})
        return int(sum(steps for t in choice.values() for steps, _ in t["val_by_steps"]))
    tasks_of, local_steps = holdings(history), _field(config, "local_steps")
    if rule == "per_round_pair":
        return sum(tasks_of.get(k, 0) * local_steps for entry in history for k in entry["sampled"])
    return _field(config, "rounds") * local_steps * sum(tasks_of.values())  # per_pair and pooled: the same total


def _field(config: Mapping, name: str) -> int:
    try:
        return int(config[name])
    except (KeyError, TypeError, ValueError):
        raise ValueError(
            f"config.json field {name!r} is {config.get(name)!r}; a run's config needs it as an integer "
            f"to count client steps"
        ) from None


def run_cost(folder: str | Path, seed: int | None = None) -> RunCost:
    """The cost of the finished run in ``folder`` (its ``config.json`` and ``metrics.json``)."""
    folder = Path(folder)
    config, saved = _read_json(folder / "config.json"), _read_json(folder / "metrics.json")
    method = config.get("method", saved.get("method"))
    history, final = saved.get("history") or [], saved.get("final") or {}
    if not history or "rounds" not in final:
        raise ValueError(f"{folder / 'metrics.json'} holds no finished run (no history or final summary)")
    up = sum(int(h["bytes_up"].get("total", 0)) for h in history)
    down = sum(int(h["bytes_down"].get("total", 0)) for h in history)
    if (up, down) != (final.get("total_bytes_up", up), final.get("total_bytes_down", down)):
        raise ValueError(
            f"{folder / 'metrics.json'}: the rounds' bytes ({up} up, {down} down) do not add up to the "
            f"final totals ({final.get('total_bytes_up')} up, {final.get('total_bytes_down')} down)"
        )
    steps = client_steps(method, config, history)
    server = (
        float(sum(h.get("server_seconds", 0.0) for h in history))
        if method in ITERATIVE
        else None
        if method in ONE_SHOT
        else 0.0
    )
    return RunCost(
        method=method,
        seed=int(config.get("seed", -1) if seed is None else seed),
        bytes_up=up,
        bytes_down=down,
        rounds=len(history) if up + down > 0 else 0,
        steps=steps,
        images=steps * _field(config, "batch_size"),
        server_state_bytes=int(final.get("server_state_bytes", 0)),
        server_seconds=server,
        wall_seconds=float(final.get("seconds_total", math.nan)),
        tuned="tuning" in final,
    )


MEASURES = (
    "bytes_up",
    "bytes_down",
    "bytes_total",
    "rounds",
    "steps",
    "images",
    "server_state_bytes",
    "server_seconds",
    "wall_seconds",
)


def summarise_costs(folders: Mapping[int, str | Path], methods: Sequence[str]) -> dict:
    """Costs of ``methods`` over seeds: ``folders`` maps each seed to its comparison folder (one subfolder per
    method). Per method: the mean of each measure over seeds (None where a measure is None) and every seed's."""
    out: dict = {}
    for m in methods:
        runs = [run_cost(Path(folders[s]) / m, s) for s in sorted(folders)]
        row: dict = {}
        for key in MEASURES:
            vals = [getattr(c, key) for c in runs]
            row[key] = None if any(v is None for v in vals) else float(np.mean(vals))
        row["tuned"] = any(c.tuned for c in runs)
        row["per_seed"] = {str(c.seed): asdict(c) | {"bytes_total": c.bytes_total} for c in runs}
        out[m] = row
    return {"methods": out, "seeds": sorted(folders)}


def add_costs(summary: dict, folders: Mapping[int, str | Path]) -> dict:
    """``summary`` (``stats.aggregate_seeds``) with ``costs``: ``summarise_costs`` of its methods plus
    ``costs_in_words``. The comparison calls this once its run folders are finished."""
    summary["costs"] = summarise_costs(folders, list(summary["methods"]))
    summary["costs"]["sentences"] = costs_in_words(summary)
    return summary


# ------------------------------------------------------------------------------------------------ words


def _mb(x: float) -> str:
    return f"{x / 1e6:,.1f} MB"


def _verdict(d: Mapping) -> int:
    """+1: the target is ahead (interval above 0), -1: behind (below 0), 0: the interval holds 0."""
    lo, hi = d["ci"]
    return 1 if lo > 0 else -1 if hi < 0 else 0


def _interval(d: Mapping) -> str:
    return f"{d['mean']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]"


def _best(summary: Mapping, candidates: Sequence[str]) -> str | None:
    present = [m for m in candidates if m in summary["methods"] and m in summary.get("costs", {}).get("methods", {})]
    return max(present, key=lambda m: summary["methods"][m]["mean_normalised"][0], default=None)


def costs_in_words(summary: Mapping, target: str = "matu") -> list[str]:
    """Sentences that answer "the target, or per-task FedAvg / the best one-shot merger?" from the cost table
    and the paired intervals of ``summary``, and test claim (2) against ``individual``.

    An accuracy difference counts only when its paired interval on the normalised score excludes 0; bytes and
    steps are compared as recorded. Every verdict comes from the numbers, so swapping two methods' numbers swaps
    the words."""
    costs, methods, diffs = summary["costs"]["methods"], summary["methods"], summary["differences"]
    if target not in costs:
        return []
    name = "MaTU" if target == "matu" else target
    me = costs[target]
    n = len(summary["seeds"])
    over = f"over {n} seed{'s' if n != 1 else ''}"
    out = []
    for other in ("per_task_fedavg", _best(summary, ONE_SHOT)):
        if other is None or other not in costs or other not in diffs:
            continue
        c, d = costs[other], diffs[other]["normalised"]
        share = methods[target]["mean_normalised"][0] / methods[other]["mean_normalised"][0]
        verdict = _verdict(d)
        acc = {1: "ahead", -1: "behind", 0: "not separated: the interval holds 0"}[verdict]
        state = (
            f"; the server keeps {_mb(me['server_state_bytes'])} between rounds against {_mb(c['server_state_bytes'])}"
            if me["server_state_bytes"] != c["server_state_bytes"]
            else ""
        )
        out.append(
            f"{name} reaches {share:.0%} of the normalised accuracy of {other} ({name} - {other} "
            f"{_interval(d)} normalised, {acc}; absolute {_interval(diffs[other]['acc'])}) with "
            f"{me['bytes_total'] / c['bytes_total']:.2f}x its bytes over the run ({_mb(me['bytes_total'])} "
            f"against {_mb(c['bytes_total'])}, up and down), {me['steps'] / c['steps']:.2f}x its client "
            f"optimiser steps and {_rounds(me['rounds'])} against {c['rounds']:.0f}{state}, {over}."
        )
        out.append(_choice(name, other, me, c, verdict))
    if "individual" in diffs:
        out.append(claim_two(summary, target))
    return out


def _rounds(r: float) -> str:
    return f"{r:.0f} synchronisation round{'s' if r != 1 else ''}"


def _ratio(a: float, b: float) -> float:
    return max(a, b) / min(a, b) if min(a, b) > 0 else math.inf


def _choice(name: str, other: str, me: Mapping, c: Mapping, verdict: int) -> str:
    """When each of the two is the better choice, on accuracy (``verdict``: the interval), bytes and rounds."""
    cheaper = name if me["bytes_total"] < c["bytes_total"] else other
    dearer = other if cheaper == name else name
    factor = _ratio(me["bytes_total"], c["bytes_total"])
    if c["rounds"] <= 1 < me["rounds"]:  # a one-shot merger against an iterative method
        per_round = me["bytes_total"] / me["rounds"]
        even = c["bytes_total"] / per_round
        bytes_part = (
            f"one {name} round moves {_mb(per_round)}, so {name} passes the bytes of the single exchange "
            f"of {other} ({_mb(c['bytes_total'])}) after {even:.1f} rounds and over these {me['rounds']:.0f} "
            f"rounds {cheaper} moves {factor:.2f}x fewer bytes"
        )
        refresh = (
            f"a further {name} round moves {_mb(per_round)} where a fresh one-shot merge resends "
            f"{_mb(c['bytes_total'])}"
        )
        if verdict > 0:
            return (
                f"{name} is more accurate and pays with rounds: {bytes_part}. Choose {other} for clients that "
                f"take part only once (late joiners, one-off contributors) or cannot spend {even:.1f} rounds' "
                f"bytes; choose {name} when accuracy matters and clients stay for several rounds, and when data "
                f"keeps arriving ({refresh})."
            )
        if verdict < 0:
            return (
                f"{other} is more accurate with a single exchange, the better choice on these numbers: "
                f"{bytes_part}. {name} pays off only when data keeps arriving ({refresh})."
            )
        upload = (me["bytes_up"] / me["rounds"]) / c["bytes_up"] if c["bytes_up"] else math.inf
        if cheaper == other:
            return (
                f"Accuracy does not separate {name} and {other}; {bytes_part}. With a fixed task set {other} is "
                f"the better choice on these numbers: one exchange, fewer bytes for any run longer than "
                f"{even:.1f} {name} rounds, and it suits clients that take part only once (late joiners, one-off "
                f"contributors). {name} pays off when data keeps arriving ({refresh}) or when a link cannot take "
                f"the one-shot upload at once (one {name} round uploads {upload:.2f}x of it)."
            )
        return (
            f"Accuracy does not separate {name} and {other}; {bytes_part}, so {name} is the better choice for "
            f"clients that stay for the whole run, and {other} for clients that take part only once (late "
            f"joiners, one-off contributors)."
        )
    if verdict == 0:
        return (
            f"Accuracy does not separate {name} and {other}, so {cheaper} is the better choice on these numbers: "
            f"{dearer} needs {factor:.2f}x its bytes."
        )
    better = name if verdict > 0 else other
    if better == cheaper:
        return (
            f"{better} is the better choice on these numbers: more accurate, and {dearer} needs "
            f"{factor:.2f}x its bytes."
        )
    return (
        f"Choose {better} when accuracy matters most, {cheaper} when bandwidth is the constraint ({dearer} needs "
        f"{factor:.2f}x the bytes)."
    )


def claim_two(summary: Mapping, target: str = "matu") -> str:
    """Claim (2), "comparable to per-task fine-tuning", tested against ``individual`` (pooled data, same steps)
    with its paired interval; where per-task FedAvg (no unification) is in the table, how much of the gap it
    shares."""
    diffs, methods = summary["differences"], summary["methods"]
    costs = summary.get("costs", {}).get("methods", {})
    name = "MaTU" if target == "matu" else target
    n = len(summary["seeds"])
    over = f"over {n} seed{'s' if n != 1 else ''}"
    d, a = diffs["individual"]["normalised"], diffs["individual"]["acc"]
    verdict = _verdict(d)
    steps = ""
    if target in costs and "individual" in costs and costs["individual"]["steps"]:
        steps = f", {costs[target]['steps'] / costs['individual']['steps']:.2f}x its optimiser steps"
    judged = {
        0: f"the interval holds 0: on these numbers {name} is comparable to per-task fine-tuning",
        -1: f"the interval lies below 0: on these numbers {name} falls short of per-task fine-tuning",
        1: f"the interval lies above 0: on these numbers {name} beats per-task fine-tuning",
    }[verdict]
    text = (
        f"Claim (2) against per-task fine-tuning on pooled data (`individual`{steps}): {name} - individual = "
        f"{_interval(d)} normalised, {_interval(a)} absolute, {over}; {judged}."
    )
    ref = methods["individual"]["mean_normalised"][0]
    if verdict < 0 and "per_task_fedavg" in methods:
        gap = ref - methods[target]["mean_normalised"][0]
        shared = ref - methods["per_task_fedavg"]["mean_normalised"][0]
        if gap > 0:
            text += (
                f" per_task_fedavg, which never unifies task vectors, is {shared:.3f} below individual too "
                f"({shared / gap:.0%} of {name}'s gap of {gap:.3f}), so that much of the gap comes with "
                f"federated training itself, not with unification."
            )
    return text


# ------------------------------------------------------------------------------------------------ table


def cost_rows(summary: Mapping) -> list[dict]:
    """One row per method: accuracy (abs, normalised), the paired difference target - method, and the costs."""
    costs, target = summary["costs"]["methods"], summary["target"]
    rows = []
    for m, c in costs.items():
        acc, diff = summary["methods"][m], summary["differences"].get(m)
        rows.append(
            {
                "method": m,
                "mean_acc": acc["mean_acc"][0],
                "mean_normalised": acc["mean_normalised"][0],
                "diff_normalised": None if diff is None else diff["normalised"],
                "bytes_up": c["bytes_up"],
                "bytes_down": c["bytes_down"],
                "bytes_total": c["bytes_total"],
                "rounds": c["rounds"],
                "steps": c["steps"],
                "images": c["images"],
                "server_state_bytes": c["server_state_bytes"],
                "server_seconds": c["server_seconds"],
                "target": m == target,
                "tuned": c.get("tuned", False),
            }
        )
    return rows


SECTION = "## Cost over the run"


def cost_section(summary: Mapping, title: str | None = SECTION) -> list[str]:
    """Markdown lines of the "Cost over the run" section (empty when ``summary`` has no ``costs``); ``title``
    None leaves the heading out (a notebook gives its own)."""
    if not summary.get("costs"):
        return []
    target, n = summary["target"], len(summary["seeds"])
    t_name = "MaTU" if target == "matu" else target
    lines = ([title, ""] if title else []) + [
        (
            f"Totals over the whole run, mean over {n} seed{'s' if n != 1 else ''}: serialised bytes as recorded "
            "(up, down, both), synchronisation rounds, client optimiser steps by each method's budget rule and "
            "the images they see (steps x batch, an upper bound), bytes the server keeps between rounds and the "
            "measured seconds of its half of the rounds (one-shot merging is not timed apart: -). Recorded wall "
            "seconds are left out: the one-shot mergers reuse `local`'s training, so theirs omit it."
        ),
        "",
        (
            f"| method | mean acc (abs) | mean normalised | {t_name} - method, normalised | bytes up | bytes down | "
            "bytes up+down | rounds | client steps | images | server state | server s |"
        ),
        "|" + "---|" * 12,
    ]
    for r in cost_rows(summary):
        name = f"**{r['method']}**" if r["target"] else r["method"] + (" (tuned)" if r["tuned"] else "")
        diff = "-" if r["diff_normalised"] is None else _interval(r["diff_normalised"])
        secs = "-" if r["server_seconds"] is None else f"{r['server_seconds']:.1f}"
        lines.append(
            f"| {name} | {r['mean_acc']:.3f} | {r['mean_normalised']:.3f} | {diff} | {_mb(r['bytes_up'])} | "
            f"{_mb(r['bytes_down'])} | {_mb(r['bytes_total'])} | {r['rounds']:.0f} | {r['steps']:,.0f} | "
            f"{r['images']:,.0f} | {_mb(r['server_state_bytes'])} | {secs} |"
        )
    sentences = summary["costs"].get("sentences") or costs_in_words(summary)
    lines += [""] + (["In words:", ""] + [f"- {s}" for s in sentences] + [""] if sentences else [])
    return lines


def without_costs(summary: Mapping) -> dict:
    """``summary`` without its ``costs``, for a seed table shown apart from the cost section."""
    return {k: v for k, v in summary.items() if k != "costs"}


def split_cost_section(text: str) -> tuple[str, str]:
    """A results file's Markdown as (everything but the "Cost over the run" section, that section)."""
    start = text.find(SECTION + "\n")
    if start < 0:
        return text, ""
    end = text.find("\n## ", start + len(SECTION))
    end = len(text) if end < 0 else end + 1
    return text[:start] + text[end:], text[start:end]


def one_seed_costs(rows: Sequence[Mapping], folder: str | Path, seed: int, n_boot: int = 2000) -> dict:
    """A one-seed ``aggregate_seeds`` summary of ``comparison.compare`` rows, with the costs of the runs in
    ``folder``: the cost table of a single run, its intervals over tasks only."""
    from .stats import aggregate_seeds

    summary = aggregate_seeds({seed: list(rows)}, rows[0]["chance"], n_boot=n_boot)
    return add_costs(summary, {seed: folder})


SETUP_FIELDS = ("preset", "model", "tasks", "n_clients", "rounds", "local_steps", "batch_size")


def committed_costs(path: str | Path = "data/results/cpu.json") -> dict:
    """A committed comparison (``compare --results``) with its ``costs``, for the notebooks' multi-seed answer."""
    path = Path(path)
    summary = _read_json(path)
    if "costs" not in summary:
        raise ValueError(f"{path} has no 'costs'; regenerate it with the command it names (compare --results)")
    return summary


def committed_cost_markdown(paths: Sequence[str | Path], config: Mapping, title: str | None = None) -> str:
    """The cost section of the first committed comparison among ``paths`` that describes ``config``'s setup
    (``SETUP_FIELDS``); failing that, of the first that exists, with a line naming what differs from this run,
    so a reader always sees the multi-seed answer and knows which setup it is for."""
    found = [Path(p) for p in paths if Path(p).exists()]
    if not found:
        return f"(no committed multi-seed results among {', '.join(Path(p).name for p in paths)})"
    summaries = {p: committed_costs(p) for p in found}

    def differ(summary: Mapping) -> list[str]:
        saved = summary.get("config", {})
        return [k for k in SETUP_FIELDS if k in saved and json.dumps(saved[k]) != json.dumps(config.get(k))]

    path = next((p for p in found if not differ(summaries[p])), found[0])
    summary = summaries[path]
    seeds = ", ".join(map(str, summary["seeds"]))
    note = differ(summary)
    preset = summary["config"].get("preset", "?")
    why = (
        f"(`{path.name}` is the `{preset}` preset's comparison: {', '.join(note)} differ from this run's, so read "
        "it as that setup's answer.)"
    )
    head = [why, ""] if note else []
    return "\n".join(head + cost_section(summary, title or f"**Committed: seeds {seeds}** (`{path.name}`)"))
