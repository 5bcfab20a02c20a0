"""Expectations: numbers stated from the committed reference, judged beside what a run measured."""

import json

import pytest

from matu_lib import regression
from matu_lib.expectations import FAILS, HOLDS, UNJUDGED, Expect, table

NB = "04_federated_run"
NEAR = {
    "methods.matu.mean_acc": "MaTU's mean accuracy (absolute)",
    "methods.matu.bytes_up_per_round": "MaTU's upload per round (bytes)",
}


def _write_reference(tmp_path, seed=0, metrics=None):
    metrics = metrics or {NB: {"methods": {"matu": {"mean_acc": 0.462, "bytes_up_per_round": 5_740_000}}}}
    ref = regression.make_reference(metrics, preset="cpu", seed=seed, parameters={}, timings={}, cells={})
    path = tmp_path / "cpu.json"
    path.write_text(json.dumps(ref))
    return path


def _run(acc, nbytes=5_740_000):
    return {"methods": {"matu": {"mean_acc": acc, "bytes_up_per_round": nbytes}}}


def test_preview_states_the_reference_numbers_with_their_tolerances(tmp_path):
    expect = Expect(NB, "cpu", 0, NEAR, reference=_write_reference(tmp_path))
    text = expect.preview_markdown()
    assert "MaTU's mean accuracy (absolute): near **0.462 ± 0.020**" in text
    assert "MaTU's upload per round (bytes): near **5,740,000**" in text  # byte counts are exact: no ±
    assert "seed 0" in text and "this run uses" not in text


@pytest.mark.parametrize("acc, status", [(0.462, HOLDS), (0.481, HOLDS), (0.443, HOLDS), (0.483, FAILS), (0.44, FAILS)])
def test_near_claims_hold_only_within_the_stored_tolerance(tmp_path, acc, status):
    expect = Expect(NB, "cpu", 0, NEAR, reference=_write_reference(tmp_path))
    claims = {c.label: c for c in expect.judge(_run(acc))}
    assert claims["MaTU's mean accuracy (absolute)"].status == status
    assert claims["MaTU's mean accuracy (absolute)"].measured == f"{acc:.3f}"


def test_exact_metrics_fail_on_one_byte(tmp_path):
    expect = Expect(NB, "cpu", 0, NEAR, reference=_write_reference(tmp_path))
    claims = {c.label: c.status for c in expect.judge(_run(0.462, 5_740_001))}
    assert claims["MaTU's upload per round (bytes)"] == FAILS


def test_another_seed_is_shown_but_not_judged(tmp_path):
    expect = Expect(NB, "cpu", 3, NEAR, reference=_write_reference(tmp_path, seed=0))
    assert "this run uses seed 3" in expect.preview_markdown()
    claims = expect.judge(_run(0.9))  # far off, but another seed: not a failure
    assert {c.status for c in claims} == {UNJUDGED}
    assert "reference seed 0, this run seed 3" in claims[0].why


def test_no_reference_means_nothing_to_expect_but_qualitative_claims_still_count(tmp_path, capsys):
    expect = Expect(NB, "gpu", 0, NEAR, reference=tmp_path / "absent.json")
    assert "No reference is committed for the `gpu` preset" in expect.preview_markdown()
    expect.that("MaTU ends above zero-shot", 0.5 > 0.3, "0.500 vs 0.300")
    expect.that("MaTU uploads less than FedAvg", 6 < 5, "6 vs 5")
    assert "expect: MaTU ends above zero-shot -> as expected (0.500 vs 0.300)" in capsys.readouterr().out
    statuses = [c.status for c in expect.judge(_run(0.5))]
    assert statuses == [UNJUDGED, UNJUDGED, HOLDS, FAILS]


def test_a_metric_the_run_did_not_measure_fails_and_one_the_reference_lacks_is_unjudged(tmp_path):
    near = NEAR | {"methods.fedavg.mean_acc": "FedAvg's mean accuracy"}
    expect = Expect(NB, "cpu", 0, near, reference=_write_reference(tmp_path))
    claims = {c.label: c for c in expect.judge({"methods": {"matu": {"mean_acc": 0.462}}})}
    assert claims["MaTU's upload per round (bytes)"].status == FAILS
    assert claims["MaTU's upload per round (bytes)"].measured == "(not measured)"
    assert claims["FedAvg's mean accuracy"].status == UNJUDGED
    assert "(not in the reference)" == claims["FedAvg's mean accuracy"].expected


def test_check_writes_every_claim_and_counts_them(tmp_path):
    expect = Expect(NB, "cpu", 0, NEAR, reference=_write_reference(tmp_path))
    expect.that("bytes positive", True, "yes")
    md = expect.check(_run(0.5), tmp_path).data
    assert "| MaTU's mean accuracy (absolute) | 0.462 ± 0.020 | 0.500 | NOT as expected |" in md
    assert "2 of 3 expectations held, 1 did not." in md
    saved = json.loads((tmp_path / "expectations.json").read_text())
    assert [c["status"] for c in saved["claims"]] == [FAILS, HOLDS, HOLDS]
    assert saved["seed"] == 0 and saved["preset"] == "cpu"


def test_a_corrupt_reference_is_one_clear_error(tmp_path):
    bad = tmp_path / "cpu.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        Expect(NB, "cpu", 0, NEAR, reference=bad)


def test_table_counts_match_the_claims():
    from matu_lib.expectations import Claim

    md = table([Claim("that", "a", "yes", "x", HOLDS), Claim("near", "b", "1", "2", UNJUDGED, "why not")])
    assert "| b | 1 | 2 | not judged (why not) |" in md
    assert md.rstrip().endswith("1 of 2 expectations held, 0 did not.")


def test_workbook_summary_counts_each_notebook_and_a_corrupt_file_counts_as_failed(tmp_path):
    from matu_lib.expectations import summarise_folder, summary_line

    expect = Expect(NB, "cpu", 0, NEAR, reference=_write_reference(tmp_path))
    (tmp_path / NB).mkdir()
    expect.that("bytes positive", True, "yes")
    expect.check(_run(0.5), tmp_path / NB)
    (tmp_path / "05_ablations").mkdir()
    (tmp_path / "05_ablations" / "expectations.json").write_text("{broken")
    counts = summarise_folder(tmp_path, [NB, "05_ablations", "06_communication"])
    assert counts == {
        NB: {"held": 2, "failed": 1, "unjudged": 0},
        "05_ablations": {"held": 0, "failed": 1, "unjudged": 0},
    }
    assert summary_line(counts[NB]) == "2 held, 1 not"
    assert summary_line({"held": 1, "failed": 0, "unjudged": 3}) == "1 held, 0 not, 3 not judged"


def test_report_lists_expectations_per_notebook(tmp_path):
    from matu_lib import report

    expect = Expect(NB, "cpu", 0, NEAR, reference=_write_reference(tmp_path))
    (tmp_path / NB).mkdir()
    expect.check(_run(0.462), tmp_path / NB)
    result = {"metrics": {NB: {}}, "timings_s": {NB: 1.0}, "total_s": 1.0, "out": tmp_path}
    page = report.write_index(tmp_path, result, preset="smoke", seed=0, parameters={}).read_text()
    assert "<h2>Expectations</h2>" in page and f"<td>{NB}</td><td>2 held, 0 not</td>" in page


def test_metrics_are_judged_as_metrics_json_holds_them(tmp_path):
    """Tuples and numpy scalars (as a notebook's dict may hold before json.dumps) are judged like the written file."""
    import numpy as np

    metrics = {NB: {"coding": {"matu/float32": {"mean_normalised": [0.7, 0.01]}}}}
    expect = Expect(
        NB,
        "cpu",
        0,
        {"coding.matu/float32.mean_normalised[0]": "coded MaTU"},
        reference=_write_reference(tmp_path, metrics=metrics),
    )
    claims = expect.judge({"coding": {"matu/float32": {"mean_normalised": (np.float64(0.71), np.nan)}}})
    assert (claims[0].status, claims[0].measured) == (HOLDS, "0.710")
