""" "What we found" cells: Markdown written from a notebook's computed numbers, so prose cannot contradict them.

    display(findings("What we found", [
        "MaTU reached {matu:.3f} mean accuracy, {vs} zero-shot ({zs:.3f}).",
    ], matu=0.46, zs=0.31, vs=direction(0.46, 0.31)))

Words that depend on the numbers (above / below, more / less) come from ``direction``, never from the author.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def direction(
    value: float,
    reference: float,
    tolerance: float = 0.005,
    words: tuple[str, str, str] = ("above", "level with", "below"),
) -> str:
    """``words[0]`` if ``value`` exceeds ``reference`` by more than ``tolerance``, ``words[2]`` if it falls short
    by more, else ``words[1]``: the comparison a sentence makes, decided by the numbers."""
    if math.isnan(value) or math.isnan(reference):
        return "not comparable with"
    if value > reference + tolerance:
        return words[0]
    if value < reference - tolerance:
        return words[2]
    return words[1]


def ratio_words(value: float, reference: float) -> str:
    """ "1.11x (11% more than)" style wording for sizes such as bytes."""
    if reference == 0:
        return "not comparable with (the reference is 0)"
    r = value / reference
    if abs(r - 1) < 0.005:
        return "the same as"
    return f"{r:.2f}x ({abs(r - 1):.0%} {'more' if r > 1 else 'less'} than)"


def findings_markdown(title: str, lines: Sequence[str], **values) -> str:
    """A Markdown heading and one bullet per line, each line formatted with ``values``."""
    return f"### {title}\n\n" + "\n".join(f"- {line.format(**values)}" for line in lines) + "\n"


def findings(title: str, lines: Sequence[str], **values):
    """``findings_markdown`` as an IPython Markdown object, rendered in Jupyter and in the HTML report."""
    from IPython.display import Markdown

    return Markdown(findings_markdown(title, lines, **values))


def grid_edge(value: float, grid: Sequence[float], name: str = "the grid") -> str:
    """ "" for a value strictly inside ``grid``; at either end, a clause saying which end it is and that the best
    value may lie beyond it: a choice at the edge of a search grid is a bound, not an optimum."""
    if len(grid) < 2 or value not in (min(grid), max(grid)):
        return ""
    end, side = ("smallest", "below") if value == min(grid) else ("largest", "above")
    return f" (the {end} value of {name}: the best may lie {side} it; widen {name} to find out)"
