"""Notebooks 04-06 run headless on the smoke preset and report what they claim (through metrics.json), and
what they measured matches ``data/references/smoke.json`` within its tolerances (the regression check of
04-06, on these same executions: nothing runs twice).

One module-scoped SHARED_DIR: notebook 05 must normalise by notebook 04's individual runs and notebook 06 must
reuse 04's finished runs instead of retraining.
"""

import json
import math

import pytest

from matu_lib import regression
from matu_lib.workbook import NOTEBOOK_DIR, REFERENCE_DIR, execute, notebook_parameters, parameters_cell

NAMES = ("04_federated_run", "05_ablations", "06_communication")
REFERENCE = regression.load_reference(REFERENCE_DIR / "smoke.json")
METHODS = REFERENCE["parameters"]["METHODS"]


def _params(name, shared):
    return notebook_parameters(name, REFERENCE["preset"], REFERENCE["seed"], shared, REFERENCE["parameters"])


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    return tmp_path_factory.mktemp("shared")


@pytest.fixture(scope="module")
def m04(shared, tmp_path_factory):
    out = tmp_path_factory.mktemp("nb04")
    return execute("04_federated_run", out, _params("04_federated_run", shared)), out


@pytest.fixture(scope="module")
def m05(m04, shared, tmp_path_factory):
    out = tmp_path_factory.mktemp("nb05")
    individual = sorted(shared.glob("compare/*/individual/metrics.json"))
    before = {p: p.stat().st_mtime_ns for p in individual}
    m = execute("05_ablations", out, _params("05_ablations", shared))
    return m, out, before


@pytest.fixture(scope="module")
def m06(m04, shared, tmp_path_factory):
    out = tmp_path_factory.mktemp("nb06")
    finished = sorted(shared.glob("compare/*/*/metrics.json"))
    before = {p: p.stat().st_mtime_ns for p in finished}
    return execute("06_communication", out, _params("06_communication", shared)), out, before


def test_04_comparison(m04):
    metrics, out = m04
    rows = metrics["methods"]
    assert set(rows) == set(METHODS)
    assert metrics["rounds"] == REFERENCE["parameters"]["OVERRIDES"]["rounds"]  # OVERRIDES reached the config
    table = metrics["table_markdown"].strip().splitlines()
    assert len(table) == 2 + len(METHODS)
    assert all(any(line.startswith(f"| {m} |") for line in table) for m in METHODS)
    assert rows["individual"]["mean_normalised"] == pytest.approx(1.0)
    assert all(0 <= r["mean_acc"] <= 1 and math.isfinite(r["mean_normalised"]) for r in rows.values())
    assert rows["matu"]["bytes_up_per_round"] < rows["per_task_fedavg"]["bytes_up_per_round"]
    assert rows["matu"]["server_state_bytes"] == 0 < rows["per_task_fedavg"]["server_state_bytes"]
    assert rows["fedavg"]["server_state_bytes"] > 0
    assert (out / "accuracy_curves.png").stat().st_size > 10_000 and (out / "final_accuracy.png").exists()


def test_06_reuses_runs_and_checks_bytes(m04, m06):
    m, out, before = m06
    assert {p.parent.name for p in before} == set(METHODS)
    assert {p: p.stat().st_mtime_ns for p in before} == before  # read back, not retrained
    assert m["matu_formula_check"]["ok"]
    for r in m["matu_formula_check"]["rounds"]:
        assert r["measured"] - r["metadata"] == r["formula"] and 0 < r["metadata"] < 1000 * r["clients"]
    up = m["bytes_up_per_round"]
    assert up["matu"]["vectors"] < up["per_task_fedavg"]["vectors"]
    assert up["matu"]["masks"] > 0 and up["fedavg"].get("masks", 0) == 0 == up["per_task_fedavg"].get("masks", 0)
    assert all(up[k].get("total", 0) == 0 for k in ("zero_shot", "individual"))
    assert m["bytes_to_target"]["individual"] == 0.0
    assert (out / "accuracy_vs_bytes.png").exists() and (out / "bytes_per_round.png").exists()
    # the compression section: every coding of CODINGS for MaTU and per-task FedAvg, float32 read back from 04
    codings = {**parameters_cell(NOTEBOOK_DIR / "06_communication.ipynb"), **REFERENCE["parameters"]}["CODINGS"]
    coding, clients = m["coding"], m["matu_formula_check"]["rounds"][0]["clients"]  # every client, every round
    assert set(coding) == {f"{meth}/{c}" for meth in ("matu", "per_task_fedavg") for c in codings}
    for meth in ("matu", "per_task_fedavg"):
        f32 = coding[f"{meth}/float32"]
        assert f32["up_bytes_per_client_round"] == pytest.approx(up[meth]["total"] / clients, rel=1e-9)
        for c in codings[1:]:
            assert coding[f"{meth}/{c}"]["up_bytes_per_client_round"] < f32["up_bytes_per_client_round"] / 3
            assert math.isfinite(coding[f"{meth}/{c}"]["mean_normalised"][0])
    assert (out / "accuracy_vs_upload.png").stat().st_size > 10_000


def test_05_ablations_line_up_with_04(m04, m05, shared):
    m, out, individual_before = m05
    rows = m["rows"]
    assert [(r["axis"], r["setting"]) for r in rows] == [
        ("masks", "MaTU"),
        ("masks", "no masks"),
        ("rescalers", "MaTU"),
        ("rescalers", "no rescalers"),
    ]
    assert all(
        r["status"] == "ok" and math.isfinite(r["mean_acc"]) and math.isfinite(r["mean_normalised"]) for r in rows
    )
    default, no_masks, _, no_rescalers = rows
    # 05 normalised by 04's individual run and reused 04's MaTU run (both read back, not retrained): same rounds,
    # same reference, so its MaTU row is 04's
    assert len(individual_before) == 1 and {p: p.stat().st_mtime_ns for p in individual_before} == individual_before
    assert m["rounds"] == m04[0]["rounds"] and m["reference"] == m04[0]["methods"]["individual"]["acc"]
    links = [f for f in (shared / "ablations").iterdir() if f.is_symlink()]
    assert [f.resolve() for f in links] == [(next(iter(individual_before)).parents[1] / "matu").resolve()]
    assert default["mean_acc"] == pytest.approx(m04[0]["methods"]["matu"]["mean_acc"], abs=1e-9)
    assert default["mean_normalised"] == pytest.approx(m04[0]["methods"]["matu"]["mean_normalised"], abs=1e-9)
    assert no_masks["bytes_up_parts"].get("masks", 0) == 0 < default["bytes_up_parts"]["masks"]
    assert no_masks["bytes_up_per_round"] == pytest.approx(
        default["bytes_up_per_round"] - default["bytes_up_parts"]["masks"], abs=1000
    )  # headers differ a little
    assert no_rescalers["bytes_up_parts"].get("rescalers", 0) == 0
    assert (out / "ablations_accuracy.png").exists()


def test_04_to_06_match_the_smoke_reference(m04, m05, m06):
    """The regression check of 04-06 (``python -m matu_lib.workbook --check data/references/smoke.json``)."""
    metrics = {"04_federated_run": m04[0], "05_ablations": m05[0], "06_communication": m06[0]}
    report = regression.drift(REFERENCE, metrics)
    assert report is None, f"metrics drifted from data/references/smoke.json (re-record it if intended):\n{report}"

    # the same check fails on drift beyond a tolerance, and only on that: an accuracy 1.5 tolerances off,
    # one byte more (byte counts are exact); a shift of half a tolerance passes
    ref = json.loads(json.dumps(REFERENCE))
    acc, nbytes = (
        ref["metrics"]["04_federated_run"][k] for k in ("methods.matu.mean_acc", "methods.matu.bytes_up_per_round")
    )
    acc["value"] += 0.5 * acc["tolerance"]
    assert regression.drift(ref, metrics) is None
    acc["value"] += acc["tolerance"]
    nbytes["value"] += 1
    drifted = regression.drift(ref, metrics).splitlines()[2:]
    assert sorted(line.split("|")[2].strip() for line in drifted) == [
        "methods.matu.bytes_up_per_round",
        "methods.matu.mean_acc",
    ]
    assert all(line.endswith("| DRIFT |") for line in drifted)


def test_04_to_06_check_their_expectations(m04, m05, m06, check_expectations):
    for name, out in zip(NAMES, (m04[1], m05[1], m06[1])):
        check_expectations(name, out, REFERENCE)
