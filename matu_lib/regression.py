"""Regression references for the workbook: record what the notebooks measured, check a later run against it.

    python -m matu_lib.workbook --preset smoke --record data/references/smoke.json
    python -m matu_lib.workbook --check data/references/smoke.json      # exit 1 on drift

A reference is one JSON file: the preset, seed and notebook parameters it was recorded with, the time each
notebook took, the package versions, and every numeric leaf of every notebook's ``metrics.json`` with an
absolute tolerance. Tolerances are set per metric when recording, from the metric's kind (``TOLERANCE_RULES``);
a person can loosen one metric by editing its ``tolerance`` in the file, and ``retolerate`` applies the rules
again to a stored reference without touching its values. A check states its result with what drifted and by
how many tolerances (``verdict``). Matrices (lists of lists) are not stored entry by entry: the notebooks also
report their summaries (family means, gaps), which are.
"""

from __future__ import annotations

import json
import math
import platform
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from .backbones import repo_root

FORMAT = "matu-workbook-reference/1"
REFERENCE_DIR = repo_root() / "data" / "references"  # committed references, one per preset (timings, metrics)

# (kind, pattern searched in the metric's dotted path, absolute tolerance, relative tolerance).
# First match wins; the stored tolerance is max(absolute, relative * |reference value|). Kinds, in rule order:
# - coded: payload sizes of a top-k coding setting (notebook 06's ``coding.<method>/<setting>`` rows whose setting
#   keeps the top k%). The kept positions travel as a zstd-coded bitmap whose length follows the values, and the
#   sizes are means over clients and rounds, so a run with another thread count moves them by a fraction of a
#   byte; 1% lets that through, while a change of coding moves them by far more.
# - exact: raw float32 and bit-packed payload sizes, parameter counts, seeds and the upload formula check are
#   fixed by the configuration and the seed; any change is a change of format or of client sampling.
# - magnitude: norms (the word ``norm``, not ``normalised``), L1 masses and rescalers scale with the encoder, so
#   they get a relative tolerance.
# - ari: the adjusted Rand index moves in large steps when one task changes cluster (about 0.12 for one of the
#   cpu preset's 12 tasks, seen between a 1-thread and a 2-thread run), so one such move is tolerated, two are not.
# - similarity: cosines, sign agreements, densities and overlaps are bounded; 0.02 absolute.
# - accuracy: accuracies and normalised accuracies, 0.02 absolute (about one image in 50 of a test split).
#   Differences of accuracies (paired differences, per seed, their means and interval ends; drops and
#   changes) are in the same units and move by the same amount when one accuracy does, so they get the same
#   absolute tolerance: a relative one on a difference near zero would flag noise. The ablation's
#   ``reference.<task>`` and the merge's ``val_mean`` are accuracies too.
# - other: anything else, 5% of its value.
TOLERANCE_RULES: tuple[tuple[str, str, float, float], ...] = (
    ("coded", r"^coding\.[^.]*top-\d+%[^.]*\.(up|down)_(bytes|bits)_", 0.0, 0.01),
    (
        "exact",
        (
            r"bytes|bits_per_param|(^|\.)(n_[a-z_]+|rounds|matu_rounds|clients|round|target_index|params|seed)$"
            r"|(^|\.)seeds\[\d+\]$|formula|metadata|measured|\.ok$"
        ),
        0.0,
        0.0,
    ),
    ("magnitude", r"(^|[._])norms?([._\[]|$)|l1_|rescaler", 0.0, 0.02),
    ("ari", r"(^|\.|_)ari(_|\.|$)", 0.2, 0.0),
    ("similarity", r"cosine|sign|overlap|density|gap|agreement|fraction|similarity|conflict", 0.02, 0.0),
    ("accuracy", r"diff|delta|(^|[._])(ci|low|high|interval|drop|change)([._\[]|$)", 0.02, 0.0),
    (
        "accuracy",
        (
            r"acc|normalised|zero_shot|individual|merged|reconstructed|unified|masked|target|val_mean"
            r"|^reference\."
        ),
        0.02,
        0.0,
    ),
    ("other", r".", 0.0, 0.05),
)
# Leaves that describe where or when a run happened, not what it measured.
SKIP = re.compile(r"folder|path|seconds|time|duration|elapsed", re.I)
# Packages whose versions can move the numbers; recorded with every reference.
PACKAGES = (
    "torch",
    "torchvision",
    "open_clip_torch",
    "numpy",
    "scikit-learn",
    "scipy",
    "safetensors",
    "matplotlib",
    "pandas",
    "papermill",
    "nbclient",
    "ipykernel",
    "jupyter_client",
    "flwr",
)


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that can change results (``python`` included)."""
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def flatten(metrics, prefix: str = "") -> dict[str, float | bool]:
    """Numeric and boolean leaves as ``{"a.b[2].c": value}``; strings, None and matrices are left out."""
    out: dict[str, float | bool] = {}
    if isinstance(metrics, dict):
        for key, value in metrics.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            if not SKIP.search(str(key)):
                out |= flatten(value, path)
    elif isinstance(metrics, list):
        if not any(isinstance(v, list) for v in metrics):  # a matrix is summarised elsewhere
            for i, value in enumerate(metrics):
                out |= flatten(value, f"{prefix}[{i}]")
    elif isinstance(metrics, bool):
        out[prefix] = metrics
    elif isinstance(metrics, (int, float)):
        out[prefix] = float(metrics)
    return out


def tolerance_for(path: str, value: float | bool) -> tuple[str, float]:
    """The default (kind, absolute tolerance) of one metric, from ``TOLERANCE_RULES``."""
    if isinstance(value, bool):
        return "exact", 0.0
    for kind, pattern, absolute, relative in TOLERANCE_RULES:
        if re.search(pattern, path, re.I):
            scale = abs(value) if math.isfinite(value) else 0.0
            return kind, max(absolute, relative * scale)
    raise AssertionError("the last rule matches everything")


def make_reference(
    metrics: dict[str, dict],
    *,
    preset: str,
    seed: int,
    parameters: dict,
    timings: dict[str, float],
    cells: dict[str, int],
    cpu: dict[str, float] | None = None,
    machine: dict | None = None,
) -> dict:
    """A reference from one finished run: every notebook's metrics with default tolerances, and context.

    ``timings`` are wall seconds per notebook; ``cpu`` the kernels' CPU seconds and ``machine`` the CPU count
    and load averages around the run, so a reader can tell an idle machine's timings from a busy one's.
    """
    stored = {}
    for name, m in metrics.items():
        stored[name] = {}
        for path, value in flatten(m).items():
            kind, tol = tolerance_for(path, value)
            stored[name][path] = {"value": value, "tolerance": tol, "kind": kind}
    return {
        "format": FORMAT,
        "preset": preset,
        "seed": seed,
        "parameters": parameters,
        "recorded_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "packages": package_versions(),
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "cpu_s": {k: round(v, 1) for k, v in (cpu or {}).items()},
        "machine": machine or {},
        "cells": cells,
        "metrics": stored,
    }


def retolerate(reference: dict) -> dict:
    """A copy of ``reference`` with every metric's kind and tolerance recomputed by ``TOLERANCE_RULES``.

    The rules decide what a metric is, so when they change, a reference recorded under the old rules is brought
    in line without running anything again: the stored values stay as they are (the same floats), and every
    tolerance, one a person loosened by hand included, returns to its default.
    """
    out = json.loads(json.dumps(reference))
    for metrics in out["metrics"].values():
        for path, entry in metrics.items():
            entry["kind"], entry["tolerance"] = tolerance_for(path, entry["value"])
    return out


def load_reference(path: str | Path) -> dict:
    """Read and validate a reference file; raises ValueError with one line naming the problem."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"reference {path} does not exist (record one with --record {path})")
    try:
        ref = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"reference {path} is not valid JSON ({err})") from None
    if not isinstance(ref, dict) or ref.get("format") != FORMAT:
        raise ValueError(
            f"reference {path} is not a {FORMAT} file (format: "
            f"{ref.get('format') if isinstance(ref, dict) else None!r})"
        )
    for key in ("preset", "seed", "parameters", "metrics"):
        if key not in ref:
            raise ValueError(f"reference {path} has no '{key}'")
    return ref


@dataclass(frozen=True)
class Row:
    notebook: str
    metric: str
    reference: float | bool | None
    now: float | bool | None
    tolerance: float | None
    status: str  # "ok", "DRIFT", "missing" (in the reference, not in this run), "new" (not in the reference)

    @property
    def failed(self) -> bool:
        return self.status in ("DRIFT", "missing")

    @property
    def excess(self) -> float | None:
        """How far ``now`` is from the reference in units of the tolerance (1 is the edge); inf for any change of
        an exact metric, a boolean or a NaN; None when there is nothing to compare."""
        if self.reference is None or self.now is None or self.tolerance is None:
            return None
        if isinstance(self.reference, bool) or isinstance(self.now, bool):
            return 0.0 if self.reference == self.now else math.inf
        if math.isnan(self.reference) or math.isnan(self.now):
            return 0.0 if math.isnan(self.reference) and math.isnan(self.now) else math.inf
        off = abs(self.now - self.reference)
        return off / self.tolerance if self.tolerance > 0 else (0.0 if off == 0 else math.inf)


def within(ref: float | bool, now: float | bool, tol: float) -> bool:
    """Whether ``now`` is within ``tol`` of ``ref`` (booleans: equal; NaN matches only NaN)."""
    if isinstance(ref, bool) or isinstance(now, bool):
        return ref == now
    if math.isnan(ref) or math.isnan(now):
        return math.isnan(ref) and math.isnan(now)
    return abs(now - ref) <= tol * (1 + 1e-9) + 1e-12  # the slack only absorbs float rounding of the stored values


def compare(reference: dict, metrics: dict[str, dict]) -> list[Row]:
    """One row per metric of every notebook that ran; notebooks in the reference that did not run are skipped.

    A notebook that ran but wrote no metrics counts as all its metrics missing (a failure).
    """
    rows = []
    for name, now_metrics in metrics.items():
        stored = reference["metrics"].get(name)
        if stored is None:
            rows.append(Row(name, "(whole notebook)", None, None, None, "new"))
            continue
        now = flatten(now_metrics or {})
        for path, entry in stored.items():
            if path not in now:
                rows.append(Row(name, path, entry["value"], None, entry["tolerance"], "missing"))
            else:
                ok = within(entry["value"], now[path], entry["tolerance"])
                rows.append(Row(name, path, entry["value"], now[path], entry["tolerance"], "ok" if ok else "DRIFT"))
        rows += [Row(name, p, None, v, None, "new") for p, v in now.items() if p not in stored]
    return rows


def drift(reference: dict, metrics: dict[str, dict]) -> str | None:
    """The Markdown table of the metrics that drifted or went missing, or None when all are within tolerance."""
    rows = compare(reference, metrics)
    return table(rows, only_failed=True) if any(r.failed for r in rows) else None


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if math.isfinite(value) and float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.6g}"


def table(rows: list[Row], only_failed: bool = False) -> str:
    """A Markdown table: notebook, metric, reference, now, tolerance, ok."""
    lines = ["| notebook | metric | reference | now | tolerance | ok |", "|---|---|---|---|---|---|"]
    for r in rows:
        if only_failed and not r.failed:
            continue
        lines.append(
            f"| {r.notebook} | {r.metric} | {_fmt(r.reference)} | {_fmt(r.now)} | "
            f"{'-' if r.tolerance is None else f'{r.tolerance:.3g}'} | {r.status} |"
        )
    return "\n".join(lines)


def describe(row: Row) -> str:
    """One metric's result in words: its value now and in the reference, and how far off against its tolerance."""
    name = f"{row.notebook} {row.metric}"
    if row.status == "missing":
        return f"{name} is missing from this run (reference {_fmt(row.reference)})"
    if row.status == "new":
        return f"{name} is new (not in the reference)"
    excess = row.excess
    if isinstance(row.reference, bool) or isinstance(row.now, bool) or math.isnan(row.reference) or math.isnan(row.now):
        how = "" if excess == 0 else " (must be equal)"
    elif row.tolerance == 0:
        how = "" if excess == 0 else f" (off by {_fmt(abs(row.now - row.reference))}; exact: tolerance 0)"
    else:
        how = f" ({excess:.1f}x its tolerance {row.tolerance:.3g})"
    return f"{name} {_fmt(row.now)} vs {_fmt(row.reference)} in the reference{how}"


def verdict(rows: list[Row], reference: str, limit: int = 5) -> str:
    """The check's result in one line: all within tolerance, or how many drifted and the worst ``limit`` of them,
    each with its distance in tolerances, so a reader can tell a near miss from a real change at a glance."""
    s = summary(rows)
    if s["passed"]:
        return f"passed: all {s['checked']} metrics within tolerance of {reference}"
    failed = sorted((r for r in rows if r.failed), key=lambda r: -math.inf if r.excess is None else -r.excess)
    shown = "; ".join(describe(r) for r in failed[:limit])
    more = f"; {len(failed) - limit} more in the table" if len(failed) > limit else ""
    return f"{s['failed']} of {s['checked']} metrics drifted from {reference}: {shown}{more}"


def summary(rows: list[Row]) -> dict:
    """Counts per notebook and overall, for the report and the exit code."""
    per = {}
    for r in rows:
        s = per.setdefault(r.notebook, {"ok": 0, "DRIFT": 0, "missing": 0, "new": 0})
        s[r.status] += 1
    failed = sum(r.failed for r in rows)
    return {
        "passed": failed == 0,
        "failed": failed,
        "checked": sum(r.status != "new" for r in rows),
        "per_notebook": per,
    }
