"""The seven notebooks as sources (nothing executed): one parameter vocabulary, one setup call, one way to show
figures, stripped outputs, and every file they (or the library) point to exists. Plus the notebook helpers."""

import json
import re

import pytest

from matu_lib import notebook
from matu_lib.backbones import repo_root
from matu_lib.workbook import NOTEBOOK_DIR, NOTEBOOKS, has_outputs, parameters_cell

ROOT = repo_root()


def _code(name: str) -> list[str]:
    nb = json.loads((NOTEBOOK_DIR / f"{name}.ipynb").read_text())
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_one_parameter_vocabulary_with_valid_cpu_defaults(name):
    path = NOTEBOOK_DIR / f"{name}.ipynb"
    params = parameters_cell(path)  # raises unless exactly one parameters cell of flat literals
    assert set(notebook.COMMON_PARAMETERS) <= set(params), sorted(set(notebook.COMMON_PARAMETERS) - set(params))
    assert (params["PRESET"], params["SEED"], params["OVERRIDES"], params["OUTPUT_DIR"], params["SHARED_DIR"]) == (
        "cpu",
        0,
        {},
        None,
        None,
    )
    assert "ROUNDS" not in params  # rounds are an override like any RunConfig field
    notebook.check_run_parameters(params["PRESET"], params["SEED"], params["OVERRIDES"])
    nb = json.loads(path.read_text())
    assert nb["cells"][0]["cell_type"] == "markdown" and "parameters" in nb["cells"][2]["metadata"].get("tags", [])
    assert "gpu" in "".join(nb["cells"][2]["source"])  # the GPU preset is documented where it is chosen


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_setup_is_one_call_and_figures_are_shown_one_way(name):
    code = _code(name)
    setup_cell = code[2]  # imports, parameters, setup
    assert setup_cell.startswith(
        f'cfg, out, shared = setup("{name}", PRESET, SEED, OVERRIDES, OUTPUT_DIR, SHARED_DIR)\n'
    )
    joined = "\n".join(code)
    assert "preset(" not in joined and "Path(OUTPUT_DIR" not in joined  # the config and folders come from setup
    assert ".savefig(" not in joined, "figures go through notebook.show (saved, then displayed once)"
    assert re.search(r"^show\(fig, out / \"[\w.]+\.png\"\)", joined, re.M)
    assert not any(line.strip() == "fig" for line in joined.splitlines()), (
        "a bare `fig` would display a figure a second way"
    )


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_sources_are_stripped_and_clean(name):
    path = NOTEBOOK_DIR / f"{name}.ipynb"
    assert not has_outputs(path)
    code = "\n".join(_code(name))
    assert "sys.path" not in code and "pip install" not in code and "import *" not in code


def _referenced_files(text: str) -> set[str]:
    """Project paths named in prose or comments: `docs/method.md`, data/references/smoke.json, ...

    Templates (``<preset>``, ``{PRESET}``) and folders written by runs (results/) are not files of the project.
    """
    found = set(
        re.findall(
            r"(?<![\w/.])((?:docs|data|matu_lib|notebooks|tests|benchmarks|jupyter_config|flower_app)"
            r"/[\w./-]*\w\.(?:md|py|json|ipynb|toml|txt|yml|yaml))",
            text,
        )
    )
    found |= set(re.findall(r"`([\w-]+\.md)`", text))  # a bare file name in backticks, e.g. `paper.md`
    return {f for f in found if "<" not in f and "{" not in f}


def test_every_file_reference_resolves():
    sources = [NOTEBOOK_DIR / f"{n}.ipynb" for n in NOTEBOOKS] + sorted((ROOT / "matu_lib").glob("*.py"))
    missing = {}
    for path in sources:
        for ref in _referenced_files(path.read_text()):
            if not (ROOT / ref).exists() and not (path.parent / ref).exists():
                missing.setdefault(str(path.relative_to(ROOT)), []).append(ref)
    assert not missing, f"references to files the project does not have: {missing}"
    assert _referenced_files("see `paper.md` and docs/method.md") == {
        "paper.md",
        "docs/method.md",
    }  # the scan sees both


# ------------------------------------------------------------------------------------ the helpers


def test_setup_resolves_config_and_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("MATU_RESULTS_DIR", str(tmp_path / "results"))
    cfg, out, shared = notebook.setup("04_federated_run", "smoke", 3, {"rounds": 1, "transfer": True})
    assert (cfg.preset, cfg.seed, cfg.rounds, cfg.transfer) == ("smoke", 3, 1, True)
    assert out == tmp_path / "results" / "notebooks" / "smoke" / "04_federated_run" and out.is_dir()
    assert shared == tmp_path / "results" / "workbook" / "smoke" / "shared" and not shared.exists()
    cfg2, out2, shared2 = notebook.setup("04_federated_run", "smoke", 0, {}, tmp_path / "o", tmp_path / "s")
    assert (out2, shared2) == (tmp_path / "o", tmp_path / "s") and cfg2.rounds == 2
    assert notebook.comparison_folder(cfg, shared).parent == shared / "compare"
    assert notebook.comparison_folder(cfg, shared) != notebook.comparison_folder(cfg2, shared)  # one folder per config


@pytest.mark.parametrize(
    "preset_name, seed, overrides, error, message",
    [
        ("cpux", 0, {}, KeyError, "PRESET='cpux' is not a preset"),
        ("smoke", "0", {}, ValueError, "SEED must be an integer"),
        ("smoke", 0, {"round": 1}, TypeError, "unknown config keys ['round']"),
        ("smoke", 0, {"rounds": 2.5}, ValueError, "rounds must be an integer"),
        ("smoke", 0, {"transfer": "yes"}, ValueError, "transfer must be true or false"),
        ("smoke", 0, {"seed": 1}, ValueError, "use the SEED parameter"),
        ("smoke", 0, [("rounds", 1)], ValueError, "OVERRIDES must be a dict"),
    ],
)
def test_setup_refuses_bad_parameters_before_creating_anything(tmp_path, preset_name, seed, overrides, error, message):
    with pytest.raises(error, match=re.escape(message)):
        notebook.setup("00_quickstart", preset_name, seed, overrides, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_show_saves_closes_and_displays_the_saved_file(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import IPython.display
    import matplotlib.pyplot as plt

    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda obj: shown.append(obj))
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    path = notebook.show(fig, tmp_path / "figs" / "line.png")
    assert path == tmp_path / "figs" / "line.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert fig.number not in plt.get_fignums()  # closed: the inline backend will not draw it again
    assert len(shown) == 1 and shown[0].data == path.read_bytes()
    assert notebook.show(None, tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_every_expectation_in_the_prose_is_checked_in_code(name):
    """Each notebook states what to expect from its preset's committed reference and checks it: an Expect for
    this notebook, a preview, the final check, and after every Markdown cell that says "expect" a code cell (before
    the next Markdown cell) that records the claim with ``expect.that`` or is the final ``expect.check``."""
    cells = json.loads((NOTEBOOK_DIR / f"{name}.ipynb").read_text())["cells"]
    code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    assert f'expect = Expect("{name}", PRESET, SEED' in code and "expect.preview()" in code
    assert code.count("expect.check(metrics, out)") == 1
    unchecked = []
    for i, cell in enumerate(cells):
        text = "".join(cell["source"])
        if cell["cell_type"] != "markdown" or not re.search(r"\bexpect\b", text, re.I):
            continue
        following = []
        for nxt in cells[i + 1 :]:
            if nxt["cell_type"] == "markdown":
                break
            following.append("".join(nxt["source"]))
        if not any("expect.that(" in s or "expect.check(" in s for s in following):
            unchecked.append(text[:80])
    assert not unchecked, f"prose that expects something with no check after it: {unchecked}"


# ------------------------------------------------------------------------------ promises the default run keeps


def _markdown(name: str) -> list[str]:
    nb = json.loads((NOTEBOOK_DIR / f"{name}.ipynb").read_text())
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown"]


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.;:])\s+(?=[A-Z(`*])", " ".join(text.split())) if s]


def _demo_axes() -> list[str]:
    match = re.search(r"^DEMO_AXES \?= (\[.*\])$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    return json.loads(match.group(1))


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_each_findings_block_is_the_last_expression_of_its_cell(name):
    """A cell displays only its last expression: a second ``findings(...)`` in one cell is never shown."""
    import ast

    for source in _code(name):
        tree = ast.parse(source)
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "findings"]
        if not calls:
            continue
        last = tree.body[-1]
        assert len(calls) == 1 and isinstance(last, ast.Expr) and last.value is calls[0], (
            f"{name}: findings(...) that is not the cell's one displayed expression:\n{source[:200]}"
        )


def test_the_findings_check_sees_a_hidden_block():
    import ast

    source = 'findings("a", [])\nx = 1\nfindings("b", [])'
    tree = ast.parse(source)
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "findings"]
    assert len(calls) == 2  # the rule above rejects this cell


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_prose_promises_only_what_the_default_run_trains(name):
    """A sentence that sends the reader to notebook 05 for an ablation axis must hold on `make demo`, which trains
    only DEMO_AXES: it names a demo axis, or says the axis is trained when `ABLATION_AXES` include it."""
    from matu_lib.ablations import ABLATIONS

    demo = _demo_axes()
    skipped = [a for a in ABLATIONS if a not in demo]
    broken = []
    for text in _markdown(name):
        for s in _sentences(text):
            low = s.lower()
            if (
                "notebook 05" in low
                and "ABLATION_AXES" not in s
                and (
                    re.search(r"notebook 05 (shows|ablates|measures|tests|trains)", low)
                    or any(a in low for a in skipped)
                )
            ):
                broken.append(s)
    assert not broken, f"{name}: sentences that promise an ablation the demo does not train: {broken}"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_prose_about_transfer_and_the_sketch_matches_the_presets(name):
    """With transfer off in the presets, no sentence says the run's transfer weights act, except a prediction or
    one conditional on `transfer=True`; with cumulative sketches, no sentence says the sketch covers one round."""
    from matu_lib.presets import preset

    cpu = preset("cpu")
    broken = []
    for text in _markdown(name):
        for s in _sentences(text):
            low = s.lower()
            if (
                not cpu.transfer
                and "transfer weights" in low
                and re.search(r"\b(lets|favours?|helps?)\b", low)
                and "transfer=True" not in s
                and "predict" not in low
            ):
                broken.append(s)
            if (
                cpu.sketch_source == "cumulative"
                and "sketch" in low
                and "this round" in low
                and "sketch_source" not in s
                and '"round"' not in s
            ):
                broken.append(s)
            if re.search(r"measures how (that|the) \w+ (shrinks|grows)", low):  # prejudges the answer
                broken.append(s)
    assert not broken, f"{name}: sentences the default run contradicts: {broken}"


def test_notebooks_that_skip_transfer_or_ablation_axes_tell_the_committed_numbers():
    code = {n: "\n".join(_code(n)) for n in NOTEBOOKS}
    assert "transfer_story(cfg)" in code["02_task_similarity"]
    assert "skipped_predictions(" in code["05_ablations"]
    assert 'validation_summary("error_feedback", PRESET)' in code["03_modulators"]


def _validation_file(folder, choice, diffs):
    rows = [{"setting": "default", "mean_acc": 0.7}] + [
        {"setting": name, "mean_acc": 0.7 + m, "minus_first": {"mean": m, "ci": ci, "level": 0.95}}
        for name, m, ci in diffs
    ]
    (folder / f"cpu-validation-{choice}.json").write_text(
        json.dumps({"preset": "cpu", "seeds": [0, 1, 2], "split": "val", "rows": rows})
    )


def test_validation_summary_reads_the_committed_numbers_and_decides_from_the_intervals(tmp_path, monkeypatch):
    monkeypatch.setattr(notebook, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(notebook, "PROJECT_ROOT", tmp_path.parent)
    _validation_file(tmp_path, "transfer", [("on", 0.001, [-0.01, 0.012])])
    text = notebook.validation_summary("transfer", "smoke")  # no smoke file: the cpu preset's, named as such
    assert "`cpu` preset's validation splits" in text and "seeds 0, 1, 2" in text
    assert "`on` +0.0010 (95% interval -0.0100 to +0.0120)" in text and "No alternative beat `default`" in text
    _validation_file(tmp_path, "transfer", [("on", 0.02, [0.005, 0.03])])
    assert "`on` beat `default` beyond noise" in notebook.validation_summary("transfer", "cpu")
    assert "No committed multi-seed validation of `magnitude`" in notebook.validation_summary("magnitude", "cpu")
    (tmp_path / "cpu-validation-magnitude.json").write_text("{}")
    with pytest.raises(ValueError, match="cpu-validation-magnitude.json"):
        notebook.validation_summary("magnitude", "cpu")


def test_transfer_story_and_skipped_predictions_follow_the_run():
    from matu_lib.presets import preset

    off, on = preset("smoke"), preset("smoke", transfer=True)
    assert "`transfer=False`" in notebook.transfer_story(
        off
    ) and "cpu-validation-transfer.md" in notebook.transfer_story(off)
    assert "`transfer=True`" in notebook.transfer_story(on)
    lines = notebook.skipped_predictions(["masks", "rescalers", "error feedback"], ["masks"], "cpu")
    assert [ln.split(":")[0] for ln in lines] == ["`rescalers`", "`error feedback`"]
    assert "No multi-seed result is committed" in lines[0] and "cpu-validation-error_feedback.md" in lines[1]
    assert notebook.skipped_predictions(["masks"], ["masks"], "cpu") == []
    transfer, similarity = notebook.skipped_predictions(["transfer", "similarity"], [], "cpu")
    assert "cpu-validation-transfer.md" in transfer and similarity.endswith("that of `transfer` above.")


# ------------------------------------------------------------------------------ a first page for the reader


def test_quickstart_introduces_federated_learning_before_matu():
    cells = json.loads((NOTEBOOK_DIR / "00_quickstart.ipynb").read_text())["cells"]
    text = ["".join(c["source"]) for c in cells]
    intro = next(i for i, t in enumerate(text) if "## Federated learning" in t)
    figure = next(i for i, t in enumerate(text) if "plots.federated_round(" in t)
    glossary = next(i for i, t in enumerate(text) if "**Task vector**" in t)
    assert intro < figure < glossary
    assert all(w in text[intro] for w in ("**client**", "**server**", "**rounds**", "**FedAvg**"))
    assert "Look at" in text[figure - 1]  # the figure's one-line caption


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_the_first_output_is_the_short_config_table(name):
    setup_cell = _code(name)[2]
    assert setup_cell.rstrip().endswith("config_table(cfg)") and "\ncfg\n" not in setup_cell + "\n"


def test_config_table_shows_the_key_fields_and_keeps_the_rest_one_click_away():
    from dataclasses import fields

    from matu_lib.presets import RunConfig, preset

    page = notebook.config_table(preset("cpu")).data
    table, details = page.split("<details>")
    assert table.count("<tr>") == len(notebook.KEY_FIELDS) + 1 and "<code>local_steps</code>" in table
    assert "<code>code_block</code>" not in table and "<code>code_block</code>" in details
    assert details.count("<tr>") == len(fields(RunConfig)) and "</details>" in details
    assert set(notebook.KEY_FIELDS) <= {f.name for f in fields(RunConfig)}


def test_flag_weak_references_marks_only_tasks_whose_reference_is_not_above_zero_shot():
    import pandas as pd

    table = pd.DataFrame({"a": [0.5, 0.2], "b": [0.3, 0.3], "c": [0.4, 0.41]}, index=["individual", "zero_shot"])
    flagged = notebook.flag_weak_references(table, table.loc["individual"].to_dict(), table.loc["zero_shot"].to_dict())
    assert list(flagged.columns) == ["a", "b [! individual <= zero-shot]", "c [! individual <= zero-shot]"]
    rows = notebook.flag_weak_references(table.T, {"a": 0.9}, {"a": 0.95}, name="original")
    assert list(rows.index) == ["a [! original <= zero-shot]", "b", "c"]
    code = {n: "\n".join(_code(n)) for n in ("03_modulators", "04_federated_run")}
    assert all("flag_weak_references(" in c for c in code.values())  # the per-task tables use it


def test_run_scale_counts_images_per_client_and_task_and_steps():
    from types import SimpleNamespace

    import torch

    from matu_lib.presets import preset

    cfg = preset("smoke", rounds=3, local_steps=4, batch_size=8)

    def shard(n: int) -> tuple:
        return torch.zeros(n, 3, 2, 2), torch.zeros(n)

    clients = [SimpleNamespace(data={"a": shard(10), "b": shard(30)}), SimpleNamespace(data={"a": shard(20)})]
    ctx = SimpleNamespace(cfg=cfg, clients=clients, trainer=SimpleNamespace(n_params=1234))
    assert notebook.run_scale(ctx) == {
        "n_params": 1234,
        "images_min": 10,
        "images_max": 30,
        "images_median": 20,
        "steps": 12,
        "images_seen": 96,
    }


# ------------------------------------------------------------------------------------------- figures


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_no_figure_is_shown_twice(name):
    code = "\n".join(_code(name))
    assert not re.search(r"\bdisplay\(fig\b", code), "show() already displays the saved figure"
    paths = re.findall(r'out / "([\w.]+\.png)"', code)
    assert len(paths) == len(set(paths)), f"a figure file written twice: {sorted(paths)}"


def test_figures_that_repeated_or_hid_their_data_are_replaced():
    code = {n: "\n".join(_code(n)) for n in NOTEBOOKS}
    assert "plots.overlap_heatmap(J" in code["03_modulators"] and "vmin=0, vmax=1" not in code["03_modulators"]
    assert "grid_edge(merge['alpha'], MERGE_ALPHAS" in code["01_task_vector_geometry"]
    assert 'grid_edge(merge["alpha"], MERGE_ALPHAS' in code["01_task_vector_geometry"]  # in "What we found" too


def test_grid_edge_says_when_a_choice_sits_at_an_end_of_its_grid():
    from matu_lib.findings import grid_edge

    grid = [0.1, 0.2, 0.3, 0.5, 1.0]
    assert grid_edge(0.3, grid, "MERGE_ALPHAS") == ""
    assert "smallest value of MERGE_ALPHAS" in grid_edge(0.1, grid, "MERGE_ALPHAS") and "below" in grid_edge(0.1, grid)
    assert "largest value" in grid_edge(1.0, grid) and "above" in grid_edge(1.0, grid)
    assert grid_edge(0.5, [0.5]) == ""  # a one-value grid chose nothing


def test_the_explorer_default_is_not_the_whole_encoder_heatmap():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from matu_lib import widgets

    g = torch.Generator().manual_seed(0)
    vectors = {t: torch.randn(64, generator=g) for t in ("a1", "a2", "b1", "b2")}
    fig = widgets.similarity_explorer(vectors, None, {t: t[0] for t in vectors}, interactive=False)
    assert fig.axes[0].get_title() == "Does cosine place each task with its family?"
    assert len(fig.axes) == 1  # no colour bar: not a heatmap
    plt.close(fig)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_every_figure_has_a_caption_saying_what_to_look_at(name):
    """The Markdown before a run of figure cells holds one "Look at ..." sentence per figure in that run."""
    cells = json.loads((NOTEBOOK_DIR / f"{name}.ipynb").read_text())["cells"]
    captions, figures, missing = 0, 0, []
    for c in cells + [{"cell_type": "markdown", "source": ""}]:
        text = "".join(c["source"])
        if c["cell_type"] == "markdown":
            if figures > captions:
                missing.append(text[:60])
            captions, figures = len(re.findall(r"\bLook at\b", text)), 0
        else:
            figures += len(re.findall(r'out / "[\w.]+\.png"', text))
    assert not missing, f"{name}: figures without a caption, in the sections that end before: {missing}"


def test_injected_parameters_the_parameters_cell_lacks_are_named():
    params = 'PRESET = "cpu"\nSEED = 0\nOVERRIDES = {}\nMETHODS = ["matu"]\n'
    ran = ["", "import json", params, '# Parameters\nPRESTE = "smoke"\nSEED = 1\n', "cfg = setup(...)"]
    assert notebook.injected_parameters(ran) == (["PRESTE"], ["METHODS", "OVERRIDES", "PRESET", "SEED"])
    assert notebook.injected_parameters(ran[:3] + ['# Parameters\nPRESET = "smoke"\n']) == (
        [],
        sorted(["METHODS", "OVERRIDES", "PRESET", "SEED"]),
    )
    assert notebook.injected_parameters(ran[:3]) == ([], [])  # opened in Jupyter: nothing injected


def test_papermill_run_with_an_unknown_parameter_stops_at_setup(tmp_path):
    """papermill itself only warns about ``-p PRESTE smoke``; the notebook's first cell refuses it."""
    import nbformat
    import papermill

    from matu_lib.workbook import _kernel_manager_class

    params = nbformat.v4.new_code_cell('PRESET = "smoke"\nSEED = 0\nOVERRIDES = {}\nOUTPUT_DIR = None')
    params.metadata["tags"] = ["parameters"]
    setup = nbformat.v4.new_code_cell(
        'from matu_lib.notebook import setup\nsetup("t", PRESET, SEED, OVERRIDES, OUTPUT_DIR)'
    )
    nbformat.write(nbformat.v4.new_notebook(cells=[params, setup]), tmp_path / "t.ipynb")
    run = dict(
        kernel_name="python3", language="python", progress_bar=False, kernel_manager_class=_kernel_manager_class()
    )
    with pytest.raises(papermill.PapermillExecutionError) as err:
        papermill.execute_notebook(str(tmp_path / "t.ipynb"), str(tmp_path / "o.ipynb"), {"PRESTE": "cpu"}, **run)
    assert err.value.ename == "ValueError" and err.value.evalue == (
        "t: no parameters named ['PRESTE'] (papermill -p); its parameters cell has "
        "['OUTPUT_DIR', 'OVERRIDES', 'PRESET', 'SEED']"
    )
    papermill.execute_notebook(  # a known parameter runs
        str(tmp_path / "t.ipynb"), str(tmp_path / "o.ipynb"), {"OUTPUT_DIR": str(tmp_path / "out")}, **run
    )
    assert (tmp_path / "out").is_dir()


def test_a_truncated_shared_task_vector_file_is_recomputed(tmp_path):
    import torch

    from matu_lib.federation import build_context
    from matu_lib.presets import preset

    tiny = dict(model="matu-micro", pretrained=None, rounds=1, local_steps=1, max_train_per_task=64)
    ctx = build_context(preset("smoke", **tiny), log=lambda *_: None)
    first = notebook.shared_task_vectors(ctx, tmp_path)
    path = tmp_path / "task_vectors" / f"{ctx.tasks[0]}.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    ctx.cache.clear()
    again = notebook.shared_task_vectors(ctx, tmp_path)
    assert all(torch.equal(first[t], again[t]) for t in first)  # recomputed, the same vectors
    assert torch.equal(notebook.shared_task_vectors(ctx, tmp_path)[ctx.tasks[0]], first[ctx.tasks[0]])  # rewritten
