"""What a run should show, stated before it runs and checked beside what it measured.

A notebook states its expectations in two kinds of claim:

- **near**: a metric of its ``metrics.json`` should land near the value the committed reference of its preset
  holds (``data/references/<preset>.json``), within that metric's stored tolerance. The expected number comes
  from the file, never from the notebook's prose, so the prose cannot go stale.
- **that**: a qualitative statement ("MaTU ends above zero-shot") that the notebook decides from its own numbers.

    expect = Expect("00_quickstart", PRESET, SEED,
                    near={"matu_final_mean_acc": "MaTU's final mean accuracy (absolute)"})
    expect.preview()                      # "What to expect": the reference's numbers, before anything runs
    ...
    expect.that("MaTU ends above zero-shot", matu > zs, f"{matu:.3f} vs {zs:.3f}")   # prints one line
    ...
    expect.check(metrics, out)            # every claim beside its measured value; writes expectations.json

A near-claim can only be judged when the run matches the reference's preset and seed: on another seed the
reference value is shown for orientation and the claim is marked "other seed", not failed; on a preset with no
committed reference there is nothing to expect. Qualitative claims are judged on any run.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from .backbones import repo_root
from .regression import REFERENCE_DIR, flatten, load_reference, within

HOLDS, FAILS, UNJUDGED = "as expected", "NOT as expected", "not judged"


@dataclass(frozen=True)
class Claim:
    """One expectation and what the run gave."""

    kind: str  # "near" or "that"
    label: str
    expected: str
    measured: str
    status: str  # HOLDS, FAILS or UNJUDGED
    why: str = ""  # for UNJUDGED: the reason; for near-claims: the metric's path


def _fmt(value: float) -> str:
    if isinstance(value, bool):
        return str(value)
    if math.isfinite(value) and float(value).is_integer() and abs(value) < 1e15:
        return f"{int(value):,}"
    return f"{value:.3f}" if abs(value) >= 0.01 or value == 0 else f"{value:.2g}"


class Expect:
    """Expectations of one notebook run on ``preset`` with ``seed``.

    ``near`` maps metric paths (dotted, as ``regression.flatten`` writes them) to the words a reader sees.
    An unreadable reference file raises ValueError naming it; a missing one means "nothing to expect".
    """

    def __init__(
        self,
        notebook: str,
        preset: str,
        seed: int,
        near: dict[str, str] | None = None,
        reference: str | Path | None = None,
    ):
        self.notebook, self.preset, self.seed = notebook, preset, int(seed)
        self.near = dict(near or {})
        self.path = Path(reference) if reference is not None else REFERENCE_DIR / f"{preset}.json"
        self.reference = load_reference(self.path) if self.path.exists() else None
        self.stored: dict = (self.reference or {}).get("metrics", {}).get(notebook, {})
        self.qualitative: list[Claim] = []

    @property
    def same_run(self) -> bool:
        """Whether near-claims can be judged: the reference was recorded on this preset and seed."""
        return (
            self.reference is not None
            and self.reference["preset"] == self.preset
            and int(self.reference["seed"]) == self.seed
        )

    def _source(self) -> str:
        try:
            shown = self.path.resolve().relative_to(repo_root())
        except ValueError:
            shown = self.path
        return f"`{shown}` (recorded with seed {self.reference['seed']})"

    def expected(self, path: str) -> tuple[float, float] | None:
        """The reference's (value, tolerance) for one metric, or None when the reference does not hold it."""
        entry = self.stored.get(path)
        return None if entry is None else (entry["value"], entry["tolerance"])

    def _expected_words(self, path: str) -> str:
        e = self.expected(path)
        if e is None:
            return "(not in the reference)"
        value, tol = e
        return _fmt(value) if tol == 0 else f"{_fmt(value)} ± {_fmt(tol)}"

    def preview(self):
        """Markdown "What to expect" for the top of the notebook, from the committed reference."""
        from IPython.display import Markdown

        return Markdown(self.preview_markdown())

    def preview_markdown(self) -> str:
        head = "### What to expect\n\n"
        if self.reference is None:
            return head + (
                f"No reference is committed for the `{self.preset}` preset, so there are no numbers to "
                f"expect; the qualitative checks below still run.\n"
            )
        seed_note = (
            ""
            if self.same_run
            else (
                f" with seed {self.reference['seed']} (this run uses seed {self.seed}: expect differences of the "
                "order of "
                "the seed-to-seed spread, and the checks below leave these numbers unjudged)"
            )
        )
        lines = [f"From the committed reference {self._source()}, a run of `{self.preset}`{seed_note} should show:\n"]
        lines += [f"- {label}: near **{self._expected_words(path)}**" for path, label in self.near.items()]
        lines.append("\nThe last section prints each of these beside the measured value.")
        return head + "\n".join(lines) + "\n"

    def that(self, label: str, holds: bool, measured: str) -> None:
        """Record and print a qualitative claim decided by this run's numbers (returns nothing, so a notebook
        cell ending with it shows only the printed line)."""
        claim = Claim("that", label, "yes", measured, HOLDS if bool(holds) else FAILS)
        self.qualitative.append(claim)
        print(f"expect: {label} -> {claim.status} ({measured})")

    def judge(self, metrics: dict) -> list[Claim]:
        """Every near-claim against ``metrics`` (this notebook's metrics.json), then the qualitative claims.

        ``metrics`` goes through a JSON round trip first, so tuples and numpy scalars are judged exactly as
        metrics.json (and so the regression check) holds them."""
        now = flatten(json.loads(json.dumps(metrics, default=float)))
        claims = []
        for path, label in self.near.items():
            measured = _fmt(now[path]) if path in now else "(not measured)"
            e = self.expected(path)
            if self.reference is None:
                status, why = UNJUDGED, f"no reference for preset {self.preset}"
            elif e is None:
                status, why = UNJUDGED, f"{path} is not in the reference"
            elif path not in now:
                status, why = FAILS, f"{path} was not measured"
            elif not self.same_run:
                status, why = UNJUDGED, f"reference seed {self.reference['seed']}, this run seed {self.seed}"
            else:
                value, tol = e
                status, why = (HOLDS if within(value, now[path], tol) else FAILS), path
            claims.append(Claim("near", label, self._expected_words(path), measured, status, why))
        return claims + self.qualitative

    def check(self, metrics: dict, out: str | Path | None = None):
        """Markdown table of every claim beside its measured value; also written to ``out/expectations.json``."""
        from IPython.display import Markdown

        claims = self.judge(metrics)
        if out is not None:
            Path(out, "expectations.json").write_text(
                json.dumps(
                    {
                        "preset": self.preset,
                        "seed": self.seed,
                        "reference": str(self.path) if self.reference else None,
                        "claims": [asdict(c) for c in claims],
                    },
                    indent=1,
                )
            )
        return Markdown(table(claims))


def table(claims: list[Claim]) -> str:
    """A Markdown table: claim, expected, measured, verdict."""
    lines = ["| expectation | expected | measured | verdict |", "|---|---|---|---|"]
    for c in claims:
        verdict = c.status + (f" ({c.why})" if c.status == UNJUDGED else "")
        lines.append(f"| {c.label} | {c.expected} | {c.measured} | {verdict} |")
    held = sum(c.status == HOLDS for c in claims)
    failed = sum(c.status == FAILS for c in claims)
    return "\n".join(lines) + f"\n\n{held} of {len(claims)} expectations held, {failed} did not.\n"


def summarise_folder(out: str | Path, names) -> dict[str, dict[str, int]]:
    """Counts of held / failed / unjudged expectations per notebook of a workbook run
    (``out/<name>/expectations.json``).

    A notebook without the file (it stopped early, or predates expectations) is left out; an unreadable file
    counts as one failed expectation, so it cannot pass silently.
    """
    counts = {}
    for name in names:
        path = Path(out) / name / "expectations.json"
        if not path.exists():
            continue
        try:
            claims = json.loads(path.read_text())["claims"]
            statuses = [c["status"] for c in claims]
        except (json.JSONDecodeError, KeyError, TypeError):
            counts[name] = {"held": 0, "failed": 1, "unjudged": 0}
            continue
        counts[name] = {
            "held": statuses.count(HOLDS),
            "failed": statuses.count(FAILS),
            "unjudged": statuses.count(UNJUDGED),
        }
    return counts


def summary_line(counts: dict[str, int]) -> str:
    """ "12 held, 1 not, 2 not judged" for one notebook."""
    return f"{counts['held']} held, {counts['failed']} not" + (
        f", {counts['unjudged']} not judged" if counts["unjudged"] else ""
    )
