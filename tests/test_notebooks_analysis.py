"""Notebooks 00-03 executed headless on the smoke preset; assertions on the metrics.json they write.

One SHARED_DIR for the module, so the individual task vectors are fine-tuned once and reused (as in the
workbook). Run order matters only for speed: 01 computes the vectors, 02/03 load them.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from matu_lib.presets import preset

from matu_lib.workbook import NOTEBOOK_DIR, execute, has_outputs, parameters_cell

NAMES = ("00_quickstart", "01_task_vector_geometry", "02_task_similarity", "03_modulators")
PASSED = {"PRESET", "SEED", "OUTPUT_DIR", "SHARED_DIR"}


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    return tmp_path_factory.mktemp("shared")


@pytest.fixture(scope="module")
def results(tmp_path_factory, shared):
    cache = {}

    def get(name):
        if name not in cache:
            out = tmp_path_factory.mktemp(name)
            params = {"PRESET": "smoke", "SEED": 0, "SHARED_DIR": str(shared)}
            if name == "03_modulators":  # two sizes, a few steps: the capacity study's mechanics, not its curve
                params |= {"SIZES": [["matu-micro", None], ["matu-small", None]], "SIZE_STEPS": 4}
            cache[name] = (execute(name, out, params), out)
        return cache[name]

    return get


def _check_similarity(m, tasks):
    m = np.asarray(m)
    assert m.shape == (len(tasks), len(tasks))
    assert np.allclose(m, m.T, atol=1e-6) and np.allclose(np.diag(m), 1.0, atol=1e-5)
    assert (m >= -1 - 1e-6).all() and (m <= 1 + 1e-6).all()


@pytest.mark.parametrize("name", NAMES)
def test_notebook_source_is_clean(name):
    path = NOTEBOOK_DIR / f"{name}.ipynb"
    params = parameters_cell(path)  # raises unless exactly one parameters cell of flat literals
    assert PASSED <= set(params) and params["PRESET"] == "cpu"
    assert not has_outputs(path)
    nb = json.loads(path.read_text())
    code = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    assert "sys.path" not in code and "pip install" not in code and "import *" not in code
    assert nb["cells"][0]["cell_type"] == "markdown" and "parameters" in nb["cells"][2]["metadata"].get("tags", [])


def test_01_geometry(results):
    m, out = results("01_task_vector_geometry")
    tasks = m["tasks"]
    assert set(tasks) == set(preset("smoke").tasks)
    _check_similarity(m["cosine"], tasks)
    assert all(n > 0 for n in m["norms"].values())
    assert all(0.0 <= c <= 1.0 for c in m["sign_conflicts"].values())
    neg = m["negation"]
    # forgetting: subtracting the vector undoes fine-tuning on the target, the control barely moves
    assert m["individual"][neg["target"]] - neg["target_acc"][-1] > 0.2
    assert neg["target_acc"][-1] <= m["zero_shot"][neg["target"]] + 0.05
    assert abs(neg["control_change"]) < m["negation_drop"] / 2
    inter = m["interference"]
    assert inter["alpha"] in inter["alphas"]
    assert inter["merged_mean"] < inter["individual_mean"]  # summing vectors interferes
    for f in ("cosine.png", "sign_conflicts.png", "pca.png", "negation.png", "interference.png"):
        assert (out / f).stat().st_size > 1000


def test_02_similarity(results):
    m, out = results("02_task_similarity")
    tasks = m["tasks"]
    _check_similarity(m["cosine"], tasks)
    _check_similarity(m["sign"], tasks)
    _check_similarity(m["server_similarity_last"], tasks)
    _check_similarity(m["server_sketch_last"], tasks)
    assert -1 <= m["ari_cosine"] <= 1 and -1 <= m["ari_sign"] <= 1
    # smoke: 2 rounds; both server measures (vector cosine, update sketch) are scored every round
    assert len(m["server_gap_per_round"]) == len(m["server_ari_vector"]) == len(m["server_ari_sketch"]) == 2
    assert all(-1 <= a <= 1 for a in m["server_ari_vector"] + m["server_ari_sketch"])
    assert not np.allclose(m["server_similarity_last"], m["server_sketch_last"])  # two different measures
    # the explorer's static fallback ran headless and produced the same whole-encoder cosine heatmap
    assert (out / "explorer_default.png").stat().st_size > 1000
    # 01 and 02 read the same cached vectors, so they must report the same cosine matrix
    m01, _ = results("01_task_vector_geometry")
    assert np.allclose(m01["cosine"], m["cosine"], atol=1e-6)


def test_03_modulators(results):
    m, _ = results("03_modulators")
    assert all(0 < d < 1 for d in m["mask_density"].values())
    assert all(s > 0 for s in m["rescalers"].values())
    for t, l1 in m["l1_original"].items():  # the rescaler restores each task's L1 norm
        assert m["l1_reconstructed"][t] == pytest.approx(l1, rel=1e-4)
    acc = m["mean_accuracy"]
    assert acc["reconstructed"] >= 0.8 * acc["original"]
    assert acc["reconstructed"] >= acc["unified"] - 0.02  # modulators help (or at least do not hurt)
    assert acc["original"] > acc["zero-shot"]
    assert 0.5 <= m["election"]["agreement_mean"] <= 1
    sizes = {r["model"]: r for r in m["retention_by_size"]}
    assert set(sizes) == {"matu-micro", "matu-small"}
    assert sizes["matu-micro"]["params"] < sizes["matu-small"]["params"]
    assert all(0 < r["retention"] <= 1 + 1e-6 for r in sizes.values())


def test_00_quickstart(results):
    m, out = results("00_quickstart")
    smoke = preset("smoke")
    assert m["n_tasks"] == len(smoke.tasks) and m["n_clients"] == smoke.n_clients and m["matu_rounds"] == smoke.rounds
    assert 0 <= m["zero_shot_mean"] <= 1
    assert m["matu_final_mean_acc"] > m["zero_shot_mean"]
    folder = Path(m["matu_folder"])
    assert {"config.json", "metrics.json", "metrics.jsonl"} <= {p.name for p in folder.iterdir()}
    assert json.loads((folder / "metrics.json").read_text())["final"]["mean_acc"] == m["matu_final_mean_acc"]
