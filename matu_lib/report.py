"""The workbook's HTML index: one self-contained page an analyst can forward.

It shows the headline table (notebook 04), the key figure of each notebook (embedded, so the page works
when mailed on its own), the time each notebook took, the configuration, the package versions and the
regression-check result, and links to every executed notebook's own HTML page.
"""

from __future__ import annotations

import base64
import html
import re
from datetime import UTC, datetime
from pathlib import Path

# The one figure that says most about each notebook (file names the notebooks save into OUTPUT_DIR).
KEY_FIGURES = {
    "00_quickstart": "samples.png",
    "01_task_vector_geometry": "cosine.png",
    "02_task_similarity": "similarity_cosine_sign.png",
    "03_modulators": "variants_accuracy.png",
    "04_federated_run": "accuracy_curves.png",
    "05_ablations": "ablations_accuracy.png",
    "06_communication": "accuracy_vs_bytes.png",
}

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; }
th { background: #f3f3f3; }
.ok { color: #1e7b34; font-weight: bold; } .bad { color: #b00020; font-weight: bold; }
figure { margin: 0.5em 0 2em; } figure img { max-width: 100%; max-height: 640px; border: 1px solid #eee; }
"""


def markdown_table_html(markdown: str) -> str:
    """A Markdown pipe table (as the notebooks write) as an HTML table; ``**bold**`` cells stay bold."""
    lines = [line.strip() for line in markdown.strip().splitlines() if line.strip().startswith("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    rows = [r for r in rows if not all(re.fullmatch(r":?-+:?", c) for c in r)]  # drop the separator line
    if not rows:
        return ""

    def cell(text: str, tag: str) -> str:
        text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", html.escape(text))
        return f"<{tag}>{text}</{tag}>"

    head = "".join(cell(c, "th") for c in rows[0])
    body = "".join("<tr>" + "".join(cell(c, "td") for c in r) + "</tr>" for r in rows[1:])
    return f"<table><tr>{head}</tr>{body}</table>"


def _dict_table(d: dict, headers: tuple[str, str] = ("name", "value")) -> str:
    rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>" for k, v in d.items())
    return f"<table><tr><th>{headers[0]}</th><th>{headers[1]}</th></tr>{rows}</table>"


def _embedded_png(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _check_section(check: dict | None) -> str:
    from .regression import table, verdict

    if check is None:
        return "<p>No regression check in this run (add <code>--check REFERENCE.json</code>).</p>"
    s = check["summary"]
    result = html.escape(verdict(check["rows"], check["reference"]))
    verdict_line = f'<p class="{"ok" if s["passed"] else "bad"}">{result}</p>'
    per = {
        n: f"{c['ok']} ok, {c['DRIFT']} drifted, {c['missing']} missing, {c['new']} new"
        for n, c in s["per_notebook"].items()
    }
    failed = [r for r in check["rows"] if r.failed]
    detail = markdown_table_html(table(failed)) if failed else ""
    return (
        verdict_line
        + _dict_table(per, ("notebook", "metrics"))
        + detail
        + '<p>Every metric: <a href="regression.md">regression.md</a>.</p>'
    )


def write_index(
    out: Path, result: dict, *, preset: str, seed: int, parameters: dict, check: dict | None = None
) -> Path:
    """Write ``out/index.html`` for a finished ``workbook.run_all`` result; returns its path."""
    from .expectations import summarise_folder, summary_line
    from .presets import preset as make_preset
    from .regression import package_versions

    metrics, timings = result["metrics"], result["timings_s"]
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>MaTU workbook report ({html.escape(preset)})</title>"
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>MaTU workbook report: preset <code>{html.escape(preset)}</code>, seed {seed}</h1>",
        f"<p>Generated {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}; "
        f"{len(metrics)} notebooks in {result['total_s'] / 60:.1f} min.</p>",
        "<h2>Regression check</h2>",
        _check_section(check),
    ]
    headline = metrics.get("04_federated_run", {}).get("table_markdown")
    if headline:
        parts += [
            "<h2>Headline: every method on the same clients, tasks and seeds (test splits)</h2>",
            markdown_table_html(headline),
            "<p>Normalised = (accuracy - chance) / (individual fine-tuning accuracy - chance), per task, then "
            "averaged: 0 is chance, 1 is individual fine-tuning.</p>",
        ]
    cpu, machine = result.get("cpu_s") or {}, result.get("machine") or {}
    expected = summarise_folder(out, list(metrics))
    times = {n: f"{t:.0f} s" + (f" (kernel CPU {cpu[n]:.0f} s)" if n in cpu else "") for n, t in timings.items()}
    parts += ["<h2>Notebooks</h2>", _dict_table(times | {"total": f"{result['total_s']:.0f} s"}, ("notebook", "time"))]
    if expected:
        parts += [
            "<h2>Expectations</h2><p>What each notebook said a run should show, checked against what it measured "
            "(the table at the end of each notebook lists every claim).</p>",
            _dict_table({n: summary_line(c) for n, c in expected.items()}, ("notebook", "expectations")),
        ]
    if machine:
        parts.append(
            "<p>Machine: "
            + html.escape(", ".join(f"{k} {v}" for k, v in machine.items()))
            + " (CPU count and 1/5/15-minute load averages; wall time on a busy machine says little).</p>"
        )
    for name in metrics:
        link = f"{name}/{name}.html"
        parts.append(f'<h3><a href="{link}">{html.escape(name)}</a> ({timings.get(name, float("nan")):.0f} s)</h3>')
        figure = Path(out) / name / KEY_FIGURES.get(name, "")
        if name in KEY_FIGURES and figure.is_file():
            parts.append(
                f'<figure><img alt="{html.escape(name)} key figure" src="{_embedded_png(figure)}">'
                f"<figcaption>{html.escape(KEY_FIGURES[name])}</figcaption></figure>"
            )
        else:
            parts.append("<p>(no key figure written)</p>")
    try:
        config = make_preset(preset, seed=seed, **dict(parameters or {}).get("OVERRIDES", {})).to_dict()
    except Exception as err:  # an unknown preset name still gets a report, with the reason
        config = {"error": f"{type(err).__name__}: {err}"}
    parts += [
        "<h2>Configuration</h2>",
        _dict_table({"notebook parameters (-p)": parameters or "none"} | config),
        "<h2>Package versions</h2>",
        _dict_table(package_versions(), ("package", "version")),
        "</body></html>",
    ]
    index = Path(out) / "index.html"
    index.write_text("\n".join(parts))
    return index
