"""Notebooks 00-03 executed headless on the smoke preset; assertions on the metrics.json they write, and
the regression check: what they measured must match ``data/references/smoke.json`` within its tolerances.

The executions use the reference's own parameters (``workbook.notebook_parameters``), so these runs are the
smoke regression check of 00-03: nothing runs twice. One SHARED_DIR for the module, so the individual task
vectors are fine-tuned once and reused (as in the workbook).
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from matu_lib import regression
from matu_lib.data import get_task
from matu_lib.presets import preset
from matu_lib.workbook import REFERENCE_DIR, execute, notebook_parameters

NAMES = ("00_quickstart", "01_task_vector_geometry", "02_task_similarity", "03_modulators")
REFERENCE = regression.load_reference(REFERENCE_DIR / "smoke.json")
CFG = preset(REFERENCE["preset"], seed=REFERENCE["seed"], **REFERENCE["parameters"].get("OVERRIDES", {}))


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    return tmp_path_factory.mktemp("shared")


@pytest.fixture(scope="module")
def results(tmp_path_factory, shared):
    cache = {}

    def get(name):
        if name not in cache:
            out = tmp_path_factory.mktemp(name)
            params = notebook_parameters(name, REFERENCE["preset"], REFERENCE["seed"], shared, REFERENCE["parameters"])
            stats = {}
            cache[name] = (execute(name, out, params, stats=stats), out, stats)
        return cache[name]

    return get


def _check_similarity(m, tasks):
    m = np.asarray(m)
    assert m.shape == (len(tasks), len(tasks))
    assert np.allclose(m, m.T, atol=1e-6) and np.allclose(np.diag(m), 1.0, atol=1e-5)
    assert (m >= -1 - 1e-6).all() and (m <= 1 + 1e-6).all()


def test_01_geometry(results):
    m, out, _ = results("01_task_vector_geometry")
    tasks = m["tasks"]
    assert set(tasks) == set(preset("smoke").tasks)
    _check_similarity(m["cosine"], tasks)
    assert all(n > 0 for n in m["norms"].values())
    assert all(0.0 <= c <= 1.0 for c in m["sign_conflicts"].values())
    # what the frozen encoder offers each task before fine-tuning; smoke runs a ViT, which has no trunk probe
    assert set(m["probes"]) == set(tasks)
    for t, row in m["probes"].items():
        assert row["chance"] == pytest.approx(1 / len(get_task(t).classes))
        assert all(0.0 <= row[k] <= 1.0 for k in ("zero_shot", "probe_features", "probe_pixels"))
        assert "probe_trunk" not in row
    assert m["probes"]["mnist"]["probe_pixels"] > 0.5  # pixels separate digits well above chance (0.1)
    neg = m["negation"]
    # forgetting: subtracting the vector undoes fine-tuning on the target, the control moves less
    assert m["individual"][neg["target"]] - neg["target_acc"][-1] > 0.2
    assert neg["target_acc"][-1] <= m["zero_shot"][neg["target"]] + 0.05
    assert abs(neg["control_change"]) < m["negation_drop"] / 2
    inter = m["interference"]
    assert inter["alpha"] in inter["alphas"]
    assert inter["merged_mean"] < inter["individual_mean"]  # summing vectors interferes
    for f in ("cosine.png", "sign_conflicts.png", "pca.png", "negation.png", "interference.png"):
        assert (out / f).stat().st_size > 1000


def test_02_similarity(results):
    m, out, _ = results("02_task_similarity")
    tasks = m["tasks"]
    _check_similarity(m["cosine"], tasks)
    _check_similarity(m["sign"], tasks)
    _check_similarity(m["server_similarity_last"], tasks)
    _check_similarity(m["server_sketch_last"], tasks)
    assert -1 <= m["ari_cosine"] <= 1 and -1 <= m["ari_sign"] <= 1
    # both server measures (vector cosine, update sketch) are scored every round
    assert len(m["server_gap_per_round"]) == len(m["server_ari_vector"]) == len(m["server_ari_sketch"]) == CFG.rounds
    assert all(-1 <= a <= 1 for a in m["server_ari_vector"] + m["server_ari_sketch"])
    assert not np.allclose(m["server_similarity_last"], m["server_sketch_last"])  # two different measures
    # the explorer's static fallback ran headless and produced its per-task family separation figure
    assert (out / "explorer_default.png").stat().st_size > 1000
    # 01 and 02 read the same cached vectors, so they must report the same cosine matrix
    m01 = results("01_task_vector_geometry")[0]
    assert np.allclose(m01["cosine"], m["cosine"], atol=1e-6)


def test_03_modulators(results):
    m = results("03_modulators")[0]
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
    assert set(sizes) == {model for model, _ in REFERENCE["parameters"]["SIZES"]}
    assert sizes["matu-micro"]["params"] < sizes["matu-small"]["params"]
    assert all(0 < r["retention"] <= 1 + 1e-6 for r in sizes.values())
    # test accuracy of the originals and their reconstructions: measured for the pretrained encoder, not for the
    # random-init one (near chance after a few steps)
    assert 0 <= sizes["matu-small"]["acc_reconstructed"] <= 1 and 0 < sizes["matu-small"]["acc_original"] <= 1
    assert math.isnan(sizes["matu-micro"]["acc_original"])


def test_00_quickstart(results):
    m, out, stats = results("00_quickstart")
    # the kernel's CPU time is measured (it imported torch and trained MaTU: well over a second)
    assert 1.0 < stats["cpu_s"] and 0 < stats["wall_s"]
    assert m["n_tasks"] == len(CFG.tasks) and m["n_clients"] == CFG.n_clients and m["matu_rounds"] == CFG.rounds
    assert 0 <= m["zero_shot_mean"] <= 1
    assert m["matu_final_mean_acc"] > m["zero_shot_mean"]
    folder = Path(m["matu_folder"])
    assert {"config.json", "metrics.json", "metrics.jsonl"} <= {p.name for p in folder.iterdir()}
    assert json.loads((folder / "metrics.json").read_text())["final"]["mean_acc"] == m["matu_final_mean_acc"]


def test_00_to_03_match_the_smoke_reference(results):
    """The regression check of 00-03 (``python -m matu_lib.workbook --check data/references/smoke.json``)."""
    metrics = {name: results(name)[0] for name in NAMES}
    report = regression.drift(REFERENCE, metrics)
    assert report is None, f"metrics drifted from data/references/smoke.json (re-record it if intended):\n{report}"


@pytest.mark.parametrize("name", NAMES)
def test_00_to_03_check_their_expectations(results, name, check_expectations):
    _, out, _ = results(name)
    check_expectations(name, out, REFERENCE)
