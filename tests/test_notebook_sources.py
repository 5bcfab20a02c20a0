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
        "cpu", 0, {}, None, None)
    assert "ROUNDS" not in params  # rounds are an override like any RunConfig field
    notebook.check_run_parameters(params["PRESET"], params["SEED"], params["OVERRIDES"])
    nb = json.loads(path.read_text())
    assert nb["cells"][0]["cell_type"] == "markdown" and "parameters" in nb["cells"][2]["metadata"].get("tags", [])
    assert "gpu" in "".join(nb["cells"][2]["source"])  # the GPU preset is documented where it is chosen


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_setup_is_one_call_and_figures_are_shown_one_way(name):
    code = _code(name)
    setup_cell = code[2]  # imports, parameters, setup
    assert setup_cell.startswith(f'cfg, out, shared = setup("{name}", PRESET, SEED, OVERRIDES, OUTPUT_DIR, SHARED_DIR)\n')
    joined = "\n".join(code)
    assert "preset(" not in joined and "Path(OUTPUT_DIR" not in joined  # the config and folders come from setup
    assert ".savefig(" not in joined, "figures go through notebook.show (saved, then displayed once)"
    assert re.search(r"^show\(fig, out / \"[\w.]+\.png\"\)", joined, re.M)
    assert not any(line.strip() == "fig" for line in joined.splitlines()), \
        "a bare `fig` would display a figure a second way"


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
    found = set(re.findall(r"(?<![\w/.])((?:docs|data|matu_lib|notebooks|tests|benchmarks|jupyter_config|flower_app)"
                           r"/[\w./-]*\w\.(?:md|py|json|ipynb|toml|txt|yml|yaml))", text))
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
    assert _referenced_files("see `paper.md` and docs/method.md") == {"paper.md", "docs/method.md"}  # the scan sees both


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


@pytest.mark.parametrize("preset_name, seed, overrides, error, message", [
    ("cpux", 0, {}, KeyError, "PRESET='cpux' is not a preset"),
    ("smoke", "0", {}, ValueError, "SEED must be an integer"),
    ("smoke", 0, {"round": 1}, TypeError, "unknown config keys ['round']"),
    ("smoke", 0, {"rounds": 2.5}, ValueError, "rounds must be an integer"),
    ("smoke", 0, {"transfer": "yes"}, ValueError, "transfer must be true or false"),
    ("smoke", 0, {"seed": 1}, ValueError, "use the SEED parameter"),
    ("smoke", 0, [("rounds", 1)], ValueError, "OVERRIDES must be a dict"),
])
def test_setup_refuses_bad_parameters_before_creating_anything(tmp_path, preset_name, seed, overrides, error, message):
    with pytest.raises(error, match=re.escape(message)):
        notebook.setup("00_quickstart", preset_name, seed, overrides, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_show_saves_closes_and_displays_the_saved_file(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import IPython.display

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
        for nxt in cells[i + 1:]:
            if nxt["cell_type"] == "markdown":
                break
            following.append("".join(nxt["source"]))
        if not any("expect.that(" in s or "expect.check(" in s for s in following):
            unchecked.append(text[:80])
    assert not unchecked, f"prose that expects something with no check after it: {unchecked}"
