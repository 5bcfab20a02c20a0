"""The workbook's plumbing: ordered notebooks, headless execution with papermill, shared artefacts.

    python -m matu_lib.workbook --preset cpu            # what `make demo` runs

executes every notebook in order into ``results/workbook/<preset>/`` (gitignored), exports one HTML
report per notebook plus an index, and prints the headline table. Notebooks report through files:
each writes ``metrics.json`` (and figures) into its ``OUTPUT_DIR``; later notebooks reuse what earlier
ones saved (task vectors, finished runs) from ``SHARED_DIR`` and recompute it when it is missing, so
every notebook also runs on its own.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import time
from pathlib import Path

import torch

from .backbones import repo_root

NOTEBOOK_DIR = repo_root() / "notebooks"
NOTEBOOKS = (
    "00_quickstart",
    "01_task_vector_geometry",
    "02_task_similarity",
    "03_modulators",
    "04_federated_run",
    "05_ablations",
    "06_communication",
)


def default_results_dir() -> Path:
    return Path(os.environ.get("MATU_RESULTS_DIR", repo_root() / "results"))


# ------------------------------------------------------------------------------------ notebook files


def parameters_cell(path: str | Path) -> dict:
    """The literal values of the notebook's single ``parameters`` cell (raises if there is not exactly one)."""
    nb = json.loads(Path(path).read_text())
    cells = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(cells) != 1:
        raise ValueError(f"{path}: expected exactly one cell tagged 'parameters', found {len(cells)}")
    source = "".join(cells[0]["source"])
    values = {}
    for node in ast.parse(source).body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            raise ValueError(f"{path}: the parameters cell may only assign flat literals (found {ast.dump(node)[:60]})")
        values[node.targets[0].id] = ast.literal_eval(node.value)  # raises on anything derived
    return values


def has_outputs(path: str | Path) -> bool:
    nb = json.loads(Path(path).read_text())
    return any(c.get("outputs") or c.get("execution_count") for c in nb["cells"] if c["cell_type"] == "code")


# ------------------------------------------------------------------------------------------ execution


def execute(name: str, output_dir: str | Path, parameters: dict | None = None, html: bool = False,
            timeout: int = 1800) -> dict:
    """Run ``notebooks/<name>.ipynb`` headless; returns the ``metrics.json`` it wrote.

    Unknown parameter names are refused here (papermill would only warn and silently keep defaults).
    """
    import papermill

    source = NOTEBOOK_DIR / f"{name}.ipynb"
    params = dict(parameters or {})
    unknown = sorted(set(params) - set(parameters_cell(source)))
    if unknown:
        raise KeyError(f"{name}: no parameters named {unknown}; its parameters cell has {sorted(parameters_cell(source))}")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    params.setdefault("OUTPUT_DIR", str(output_dir.resolve()))
    executed = output_dir / f"{name}.ipynb"
    env_before = os.environ.get("MATU_PROGRESS")
    os.environ.setdefault("MATU_PROGRESS", "0")
    try:
        papermill.execute_notebook(str(source), str(executed), parameters=params, kernel_name="python3",
                                   cwd=str(NOTEBOOK_DIR), progress_bar=False, execution_timeout=timeout)
    finally:
        if env_before is None:
            os.environ.pop("MATU_PROGRESS", None)
    if html:
        export_html(executed)
    return json.loads((Path(params["OUTPUT_DIR"]) / "metrics.json").read_text())


def export_html(executed: Path) -> Path:
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_filename(str(executed))
    target = executed.with_suffix(".html")
    target.write_text(body)
    return target


def run_all(preset: str = "cpu", out: str | Path | None = None, seed: int = 0,
            names: tuple[str, ...] = NOTEBOOKS) -> dict[str, dict]:
    """Execute the notebooks in order (the main job); returns each notebook's metrics."""
    out = Path(out or default_results_dir() / "workbook" / preset)
    shared = out / "shared"
    metrics, t_all = {}, time.perf_counter()
    for i, name in enumerate(names, 1):
        t0 = time.perf_counter()
        print(f"[{i}/{len(names)}] {name} ...", flush=True)
        params = {"PRESET": preset, "SEED": seed, "SHARED_DIR": str(shared.resolve())}
        params = {k: v for k, v in params.items() if k in parameters_cell(NOTEBOOK_DIR / f"{name}.ipynb")}
        metrics[name] = execute(name, out / name, params, html=True)
        print(f"[{i}/{len(names)}] {name} done in {time.perf_counter() - t0:.0f}s", flush=True)
    index = ["<html><body><h1>MaTU workbook report</h1><ol>"]
    index += [f'<li><a href="{n}/{n}.html">{n}</a></li>' for n in names]
    (out / "index.html").write_text("\n".join(index + ["</ol></body></html>"]))
    print(f"workbook finished in {time.perf_counter() - t_all:.0f}s; report: {out / 'index.html'}")
    return metrics


# ---------------------------------------------------------------------------- shared artefacts


def individual_task_vectors(ctx, shared_dir: str | Path | None) -> dict[str, torch.Tensor]:
    """Per-task fine-tuned vectors (flat), saved under ``shared_dir`` and reused by later notebooks.

    The files carry the run config; vectors from another config are recomputed, not trusted.
    """
    from .methods import individual_task_vectors as compute
    from .task_vectors import TaskVector

    if shared_dir is None:
        return compute(ctx)
    folder = Path(shared_dir) / "task_vectors"
    stamp = json.dumps(ctx.cfg.to_dict(), sort_keys=True)
    files = {t: folder / f"{t}.safetensors" for t in ctx.tasks}
    if all(f.exists() for f in files.values()):
        try:
            loaded = {}
            for t, f in files.items():
                from safetensors import safe_open

                with safe_open(str(f), framework="pt") as h:
                    if (h.metadata() or {}).get("config") != stamp:
                        raise ValueError("stale")
                loaded[t] = TaskVector.load(f).flatten()
            ctx.cache["individual"] = loaded
            return loaded
        except ValueError:
            pass
    vectors = compute(ctx)
    for t, v in vectors.items():
        TaskVector.unflatten(v, ctx.trainer.layout).save(files[t], {"config": stamp, "task": t})
    return vectors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--only", nargs="+", default=None, help="run only these notebooks (names)")
    args = parser.parse_args(argv)
    names = tuple(args.only) if args.only else NOTEBOOKS
    missing = [n for n in names if not (NOTEBOOK_DIR / f"{n}.ipynb").exists()]
    if missing:
        print(f"error: no such notebooks: {missing}", file=sys.stderr)
        return 2
    metrics = run_all(args.preset, args.out, args.seed, names)
    headline = metrics.get("04_federated_run", {}).get("table_markdown")
    if headline:
        print("\nHeadline (test splits; normalised = accuracy / individual fine-tuning accuracy, per task):")
        print(headline)
    return 0


if __name__ == "__main__":
    sys.exit(main())
