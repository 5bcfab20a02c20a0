"""What every workbook notebook does at its start and whenever it shows a figure, written once.

    cfg, out, shared = setup("04_federated_run", PRESET, SEED, OVERRIDES, OUTPUT_DIR, SHARED_DIR)
    show(plots.final_bars(rows), out / "final_accuracy.png")

Every notebook takes the same parameters: ``PRESET`` (a name in ``presets.PRESETS``), ``SEED``, ``OVERRIDES``
(any ``RunConfig`` field, typed: ``{"rounds": 1, "transfer": True}``), ``OUTPUT_DIR`` (its own files) and
``SHARED_DIR`` (what notebooks pass to each other: task vectors, finished runs). ``setup`` checks them before
anything is computed, so a typo stops the notebook at its first cell with one line naming the problem.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .backbones import repo_root
from .federation import run
from .presets import PRESETS, RunConfig, preset
from .results_folder import run_folder
from .validation import check_overrides

# The parameters every notebook's parameters cell assigns; the workbook passes the first two and the folders.
COMMON_PARAMETERS = ("PRESET", "SEED", "OVERRIDES", "OUTPUT_DIR", "SHARED_DIR")


def check_run_parameters(preset_name: object, seed: object, overrides: object) -> dict:
    """``OVERRIDES`` checked against ``RunConfig`` (returned converted); PRESET and SEED checked too.

    Raises ValueError / TypeError / KeyError with one line naming the parameter, before any work starts.
    """
    if not isinstance(preset_name, str) or preset_name not in PRESETS:
        raise KeyError(f"PRESET={preset_name!r} is not a preset; choose one of {sorted(PRESETS)}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"SEED must be an integer, got {seed!r}")
    if not isinstance(overrides, dict):
        raise ValueError(f"OVERRIDES must be a dict of RunConfig fields, e.g. {{'rounds': 1}}, got {overrides!r}")
    for key in ("preset", "seed"):
        if key in overrides:
            raise ValueError(f"OVERRIDES may not set {key!r}: use the {key.upper()} parameter")
    return check_overrides(RunConfig, overrides)


def setup(
    name: str,
    preset_name: str,
    seed: int,
    overrides: dict | None = None,
    output_dir: str | Path | None = None,
    shared_dir: str | Path | None = None,
) -> tuple[RunConfig, Path, Path]:
    """The run config and the two folders of notebook ``name``; the output folder is created.

    Folders default to ``results/notebooks/<preset>/<name>`` and ``results/workbook/<preset>/shared`` under
    the project (``MATU_RESULTS_DIR`` moves ``results``), so a notebook opened on its own in Jupyter reuses
    what a workbook run of the same preset computed. A parameter papermill injected that the notebook's
    parameters cell lacks (a typo papermill only warns about) is refused here, before any work.
    """
    unknown, declared = injected_parameters(kernel_inputs())
    if unknown:
        raise ValueError(f"{name}: no parameters named {unknown} (papermill -p); its parameters cell has {declared}")
    overrides = check_run_parameters(preset_name, seed, {} if overrides is None else overrides)
    cfg = preset(preset_name, seed=seed, **overrides)
    out = Path(output_dir) if output_dir else default_results_dir() / "notebooks" / preset_name / name
    shared = Path(shared_dir) if shared_dir else default_results_dir() / "workbook" / preset_name / "shared"
    out.mkdir(parents=True, exist_ok=True)
    return cfg, out, shared


INJECTED_HEADER = "# Parameters\n"  # the first line of the cell papermill injects after the parameters cell


def kernel_inputs() -> list[str]:
    """The sources of the cells this kernel has run, in order ([] outside IPython)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return []
    shell = get_ipython()
    return list(shell.history_manager.input_hist_raw) if shell is not None and shell.history_manager else []


def injected_parameters(inputs: list[str]) -> tuple[list[str], list[str]]:
    """(names papermill injected that the parameters cell does not assign, the names it does assign).

    papermill only warns about a parameter the notebook lacks (``-p PRESTE smoke``) and runs on with the default,
    so ``setup`` compares its injected cell with the parameters cell run before it (the last cell assigning
    ``PRESET``) and refuses the rest. Nothing was injected: ([], [])."""
    import ast

    def assigned(source: str) -> set[str]:
        try:
            body = ast.parse(source).body
        except SyntaxError:
            return set()
        return {t.id for n in body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}

    last = max((i for i, source in enumerate(inputs) if source.startswith(INJECTED_HEADER)), default=None)
    if last is None:
        return [], []
    declared = next((assigned(s) for s in reversed(inputs[:last]) if "PRESET" in assigned(s)), None)
    if declared is None:
        return [], []
    return sorted(assigned(inputs[last]) - declared), sorted(declared)


def show(fig, path: str | Path, dpi: int = 120) -> Path | None:
    """Save ``fig`` to ``path`` and display that image; the same in every notebook and every backend.

    The figure is closed after saving, so the inline backend does not draw it a second time, and what the
    reader sees is exactly the file that tests and the HTML report use. ``fig=None`` (an optional figure
    that was not made) shows nothing.
    """
    if fig is None:
        return None
    import matplotlib.pyplot as plt
    from IPython.display import Image, display

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    display(Image(filename=str(path)))
    return path


PROJECT_ROOT = repo_root()


def project_path(path: str | Path) -> Path:
    """A path relative to the project root (where ``data/`` lives), whatever directory the kernel runs in."""
    path = Path(path)
    return path if path.is_absolute() else PROJECT_ROOT / path


def comparison_folder(cfg: RunConfig, shared: Path) -> Path:
    """Where notebook 04 keeps its finished runs for ``cfg`` (one folder per config); 02, 05 and 06 read them."""
    return run_folder(cfg, {}, Path(shared) / "compare")


def individual_reference(ctx, shared: Path, log=lambda *_: None) -> dict[str, float]:
    """Individual fine-tuning accuracy per task: notebook 04's ``individual`` run, reused (trained if missing).

    Notebook 05 normalises by the same numbers as 04, so the two tables can be read side by side.
    """
    return run(ctx, "individual", comparison_folder(ctx.cfg, shared) / "individual", resume=True, log=log).final["acc"]


def link_comparison_run(cfg: RunConfig, shared: Path, ablations: Path, method: str = "matu") -> Path | None:
    """Let notebook 05's default setting reuse notebook 04's finished ``method`` run instead of training it again.

    The ablations keep their default setting's run in ``run_folder(cfg, {}, ablations)``; when that folder does
    not exist and 04's run of the same config does, the folder becomes a link to it (the run's config file is
    still compared on reuse, so a link never passes off another configuration's numbers). Returns the link,
    or None when there was nothing to link.
    """
    source = comparison_folder(cfg, shared) / method
    target = run_folder(cfg, {}, Path(ablations))
    if not (source / "metrics.json").exists() or target.exists() or target.is_symlink():
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    target.symlink_to(source.resolve(), target_is_directory=True)
    return target


# ----------------------------------------------------------------------- committed numbers told in the notebooks

RESULTS_DIR = PROJECT_ROOT / "data" / "results"


def committed_validation(choice: str, preset_name: str) -> tuple[dict, Path] | None:
    """The committed multi-seed validation of one MaTU option (``python -m matu_lib.ablations validate``) and
    its file: the preset's own when committed, else the ``cpu`` preset's (the numbers then say which preset);
    None when neither exists.

    A notebook that skips an option tells its story from this file, so the words carry the committed numbers
    and never a copy typed by hand. An unreadable file raises ValueError naming it.
    """
    for name in dict.fromkeys((preset_name, "cpu")):
        path = RESULTS_DIR / f"{name}-validation-{choice}.json"
        if path.exists():
            try:
                data = json.loads(path.read_text())
                data["rows"][0]["setting"]
            except (ValueError, KeyError, IndexError, TypeError) as e:
                raise ValueError(f"{path}: not a validation result of `ablations validate` ({e})") from e
            return data, path
    return None


def validation_summary(choice: str, preset_name: str) -> str:
    """One paragraph from the committed validation of ``choice``: every alternative's paired difference to the
    reference setting with its interval, and whether any beat it beyond noise (interval above 0)."""
    found = committed_validation(choice, preset_name)
    if found is None:
        return (
            f"No committed multi-seed validation of `{choice}` exists "
            f"(`data/results/<preset>-validation-{choice}.json`)."
        )
    data, path = found
    rows, ref = data["rows"], data["rows"][0]
    split = "validation" if data.get("split", "val") == "val" else "test"
    parts = []
    for r in rows[1:]:
        d = r["minus_first"]
        parts.append(
            f"`{r['setting']}` {d['mean']:+.4f} ({round(100 * d['level'])}% interval {d['ci'][0]:+.4f} to "
            f"{d['ci'][1]:+.4f})"
        )
    winners = [r["setting"] for r in rows[1:] if r["minus_first"]["ci"][0] > 0]
    verdict = (
        f"`{winners[0]}` beat `{ref['setting']}` beyond noise (its interval lies above 0)."
        if winners
        else f"No alternative beat `{ref['setting']}` beyond noise: every interval reaches 0 or below."
    )
    shown = path.with_suffix(".md") if path.with_suffix(".md").exists() else path
    return (
        f"On the `{data['preset']}` preset's {split} splits (seeds {', '.join(map(str, data['seeds']))}; "
        f"`{shown.relative_to(PROJECT_ROOT)}`), mean accuracy against `{ref['setting']}` "
        f"({ref['mean_acc']:.3f}), paired on (seed, task): {'; '.join(parts)}. {verdict}"
    )


def transfer_story(cfg: RunConfig) -> str:
    """Why the server computes task similarity yet (by default) does not transfer between tasks, from the
    committed validation of ``transfer``; what this run does comes from ``cfg``, so the words match the run."""
    if cfg.transfer:
        here = (
            f"This run has `transfer=True` (similarity `{cfg.similarity}`, temperature "
            f"{cfg.transfer_temperature}, threshold {cfg.transfer_threshold}): each task's averaged vector is "
            "mixed with those of the tasks its similarity favours."
        )
    else:
        cost = (
            f" (the update sketch adds {cfg.sketch_bits // 8} bytes per task to each upload)" if cfg.sketch_bits else ""
        )
        here = (
            "This run has `transfer=False`: the server computes and logs its similarities every round"
            + cost
            + ", but every task keeps its own averaged vector; nothing is mixed between tasks."
        )
    summary = validation_summary("transfer", cfg.preset)
    return f"{here} Transfer's default was chosen on validation splits. {summary}"


def skipped_predictions(predicted_axes: list[str], trained_axes: list[str], preset_name: str) -> list[str]:
    """One line per predicted ablation axis this run did not train: where the committed numbers over seeds are,
    or that none are committed (then the axis must be added to ``ABLATION_AXES`` to test the prediction)."""
    lines, told = [], {}
    for axis in predicted_axes:
        if axis in trained_axes:
            continue
        choice = AXIS_VALIDATIONS.get(axis)
        found = committed_validation(choice, preset_name) if choice else None
        if found and choice in told:
            lines.append(
                f"`{axis}`: not trained in this run; its committed evidence is that of `{told[choice]}` above."
            )
            continue
        if found:
            told[choice] = axis
        lines.append(
            f"`{axis}`: not trained in this run. "
            + (
                validation_summary(choice, preset_name)
                if found
                else "No multi-seed result is committed for it; add it to `ABLATION_AXES` to test the prediction."
            )
        )
    return lines


# Ablation axes whose setting was chosen by ``ablations validate`` (the choice's name in ``VALIDATIONS``).
AXIS_VALIDATIONS = {
    "error feedback": "error_feedback",
    "transfer": "transfer",
    "similarity": "transfer",
    "magnitude": "magnitude",
    "fill dropped": "fill_dropped",
}


# --------------------------------------------------------------------------------- a first page for the reader

# The RunConfig fields a reader needs to follow a run, with what each means; the rest stay one click away.
KEY_FIELDS = {
    "preset": "named set of defaults (presets.py)",
    "model": "the pretrained image encoder that is fine-tuned",
    "tasks": "the image tasks of the federation",
    "n_clients": "clients (each holds private data of several tasks)",
    "tasks_per_client": "how many tasks a client holds (fewest, most)",
    "rounds": "federated rounds (download, local training, upload, aggregate)",
    "local_steps": "optimiser steps per task and round on a client",
    "batch_size": "images per optimiser step",
    "lr": "learning rate of local training",
    "participation": "fraction of clients sampled each round",
    "split": "how a shared task's images are split between its clients",
    "transfer": "whether the server mixes related tasks' vectors",
    "error_feedback": "whether clients carry what unification dropped to the next round",
    "seed": "seed of data split, initialisation and sampling",
}


def config_table(cfg: RunConfig):
    """The fields of ``KEY_FIELDS`` as a table, and every field in a collapsed block below it.

    A first reader sees what shapes the run (clients, rounds, steps) instead of fifty settings; the full config
    stays one click away for anyone reproducing it. Returns the HTML that Jupyter and the report render.
    """
    import html
    from dataclasses import asdict

    from IPython.display import HTML

    values = asdict(cfg)

    def shown(key: str) -> str:
        value = values[key]
        if key == "tasks" and value is not None:
            return f"{len(value)}: {', '.join(value)}"
        return "every task of the suite" if key == "tasks" else repr(value)

    rows = "".join(
        f"<tr><td><code>{k}</code></td><td>{html.escape(shown(k))}</td><td>{html.escape(v)}</td></tr>"
        for k, v in KEY_FIELDS.items()
    )
    full = "".join(f"<tr><td><code>{k}</code></td><td>{html.escape(repr(v))}</td></tr>" for k, v in values.items())
    return HTML(
        f"<table><tr><th>field</th><th>value</th><th>what it is</th></tr>{rows}</table>"
        f"<details><summary>all {len(values)} fields of this run's <code>RunConfig</code></summary>"
        f"<table>{full}</table></details>"
    )


def run_scale(ctx) -> dict:
    """What bounds a run's absolute accuracy: encoder size, training images per client and task, and how many
    images local training sees per client and task over the run."""
    sizes = sorted(len(d[1]) if isinstance(d, tuple) else len(d) for c in ctx.clients for d in c.data.values())
    cfg = ctx.cfg
    return {
        "n_params": ctx.trainer.n_params,
        "images_min": sizes[0],
        "images_max": sizes[-1],
        "images_median": sizes[len(sizes) // 2],
        "steps": cfg.rounds * cfg.local_steps,
        "images_seen": cfg.rounds * cfg.local_steps * cfg.batch_size,
    }


def flag_weak_references(table, reference: dict, zero_shot: dict, name: str = "individual"):
    """``table`` with every task whose ``reference`` accuracy is not above its zero-shot accuracy relabelled
    (in the index and the columns), so a normalised number built on such a reference is not read as meaningful:
    fine-tuning taught that task nothing the frozen encoder did not already know."""
    weak = {t: f"{t} [! {name} <= zero-shot]" for t in reference if t in zero_shot and reference[t] <= zero_shot[t]}
    return table.rename(index=weak, columns=weak)


def default_results_dir() -> Path:
    """Where runs go: ``$MATU_RESULTS_DIR`` or ``results/`` at the project root."""
    return Path(os.environ.get("MATU_RESULTS_DIR", repo_root() / "results"))


# ---------------------------------------------------------------------------- shared artefacts


def shared_task_vectors(ctx, shared_dir: str | Path | None) -> dict[str, torch.Tensor]:
    """Per-task fine-tuned vectors (flat), saved under ``shared_dir`` and reused by later notebooks.

    The files carry the run config; vectors from another config, and files that cannot be read (truncated,
    corrupt), are recomputed and rewritten, not trusted.
    """
    from safetensors import SafetensorError, safe_open

    from .methods import individual_task_vectors as compute  # the same budget as the `individual` method
    from .task_vectors import TaskVector

    if shared_dir is None:
        return compute(ctx)
    folder = Path(shared_dir) / "task_vectors"
    stamp = json.dumps(ctx.cfg.identity(), sort_keys=True)
    files = {t: folder / f"{t}.safetensors" for t in ctx.tasks}
    if all(f.exists() for f in files.values()):
        try:
            loaded = {}
            for t, f in files.items():
                with safe_open(str(f), framework="pt") as h:
                    if (h.metadata() or {}).get("config") != stamp:
                        raise ValueError("stale")
                loaded[t] = TaskVector.load(f).flatten()
            ctx.cache["individual"] = loaded
            return loaded
        except (ValueError, OSError, SafetensorError):
            pass
    vectors = compute(ctx)
    for t, v in vectors.items():
        TaskVector.unflatten(v, ctx.trainer.layout).save(files[t], {"config": stamp, "task": t})
    return vectors
