"""Notebooks 04-06 run headless on the smoke preset and report what they claim (through metrics.json).

One module-scoped SHARED_DIR: notebook 06 must reuse notebook 04's finished runs instead of retraining.
"""

import math

import pytest

from matu_lib.workbook import NOTEBOOK_DIR, execute, has_outputs, parameters_cell

METHODS = ["zero_shot", "individual", "matu", "fedavg", "per_task_fedavg"]
SMOKE = {"PRESET": "smoke", "ROUNDS": 1}  # one round keeps the three notebooks within a few minutes
NAMES = ("04_federated_run", "05_ablations", "06_communication")


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    return tmp_path_factory.mktemp("shared")


@pytest.fixture(scope="module")
def m04(shared, tmp_path_factory):
    out = tmp_path_factory.mktemp("nb04")
    return execute("04_federated_run", out, {**SMOKE, "SHARED_DIR": str(shared), "METHODS": METHODS}), out


@pytest.mark.parametrize("name", NAMES)
def test_notebooks_are_stripped_and_parametrised(name):
    path = NOTEBOOK_DIR / f"{name}.ipynb"
    assert not has_outputs(path)
    params = parameters_cell(path)
    assert params["PRESET"] == "cpu" and params["SEED"] == 0 and params["OUTPUT_DIR"] is None
    assert params["SHARED_DIR"] is None


def test_04_comparison(m04):
    metrics, out = m04
    rows = metrics["methods"]
    assert set(rows) == set(METHODS)
    table = metrics["table_markdown"].strip().splitlines()
    assert len(table) == 2 + len(METHODS)
    assert all(any(line.startswith(f"| {m} |") for line in table) for m in METHODS)
    assert rows["individual"]["mean_normalised"] == pytest.approx(1.0)
    assert all(0 <= r["mean_acc"] <= 1 and math.isfinite(r["mean_normalised"]) for r in rows.values())
    assert rows["matu"]["bytes_up_per_round"] < rows["per_task_fedavg"]["bytes_up_per_round"]
    assert rows["matu"]["server_state_bytes"] == 0 < rows["per_task_fedavg"]["server_state_bytes"]
    assert rows["fedavg"]["server_state_bytes"] > 0
    assert (out / "accuracy_curves.png").stat().st_size > 10_000 and (out / "final_accuracy.png").exists()


def test_06_reuses_runs_and_checks_bytes(m04, shared, tmp_path):
    finished = sorted(shared.glob("compare/*/*/metrics.json"))
    assert {p.parent.name for p in finished} == set(METHODS)
    before = {p: p.stat().st_mtime_ns for p in finished}
    m = execute("06_communication", tmp_path, {**SMOKE, "SHARED_DIR": str(shared), "METHODS": METHODS})
    assert {p: p.stat().st_mtime_ns for p in finished} == before  # read back, not retrained
    assert m["matu_formula_check"]["ok"]
    for r in m["matu_formula_check"]["rounds"]:
        assert r["measured"] - r["metadata"] == r["formula"] and 0 < r["metadata"] < 1000 * r["clients"]
    up = m["bytes_up_per_round"]
    assert up["matu"]["vectors"] < up["per_task_fedavg"]["vectors"]
    assert up["matu"]["masks"] > 0 and up["fedavg"].get("masks", 0) == 0 == up["per_task_fedavg"].get("masks", 0)
    assert all(up[k].get("total", 0) == 0 for k in ("zero_shot", "individual"))
    assert m["bytes_to_target"]["individual"] == 0.0
    assert (tmp_path / "accuracy_vs_bytes.png").exists() and (tmp_path / "bytes_per_round.png").exists()


def test_05_ablations(shared, tmp_path):
    m = execute("05_ablations", tmp_path, {**SMOKE, "SHARED_DIR": str(shared),
                                           "ABLATION_AXES": ["masks", "rescalers"]})
    rows = m["rows"]
    assert [(r["axis"], r["setting"]) for r in rows] == [("masks", "MaTU"), ("masks", "no masks"),
                                                         ("rescalers", "MaTU"), ("rescalers", "no rescalers")]
    assert all(r["status"] == "ok" and math.isfinite(r["mean_acc"]) and math.isfinite(r["mean_normalised"])
               for r in rows)
    default, no_masks, _, no_rescalers = rows
    assert no_masks["bytes_up_parts"].get("masks", 0) == 0 < default["bytes_up_parts"]["masks"]
    assert no_masks["bytes_up_per_round"] == pytest.approx(
        default["bytes_up_per_round"] - default["bytes_up_parts"]["masks"], abs=1000)  # headers differ a little
    assert no_rescalers["bytes_up_parts"].get("rescalers", 0) == 0
    assert (tmp_path / "ablations_accuracy.png").exists()
