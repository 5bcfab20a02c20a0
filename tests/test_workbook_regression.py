"""The smoke regression check end to end: every notebook runs headless once, against the committed reference.

One workbook run (module fixture, a few minutes on 2 cores) serves all tests here: the check passes, a
perturbed reference fails it (read back with --reuse, nothing runs twice), and the HTML report carries
what an analyst needs.
"""

import json

import pytest

from matu_lib import workbook

pytestmark = pytest.mark.long
REFERENCE = workbook.REFERENCE_DIR / "smoke.json"


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("workbook-smoke")
    status = workbook.main(["--check", str(REFERENCE), "--out", str(out)])
    return status, out


def test_smoke_run_matches_reference(smoke_run, capsys):
    status, out = smoke_run
    assert status == 0, (out / "regression.md").read_text()
    table = (out / "regression.md").read_text().splitlines()
    assert table[0] == "| notebook | metric | reference | now | tolerance | ok |"
    assert sum(line.endswith("| ok |") for line in table) >= 100


def test_perturbed_reference_fails_the_check(smoke_run, tmp_path, capsys):
    _, out = smoke_run
    ref = json.loads(REFERENCE.read_text())
    entry = ref["metrics"]["04_federated_run"]["methods.matu.mean_acc"]
    entry["value"] += 3 * entry["tolerance"] + 0.01
    bytes_entry = ref["metrics"]["04_federated_run"]["methods.matu.bytes_up_per_round"]
    bytes_entry["value"] += 1  # one byte more is drift: fixed-size byte counts are exact
    # what a rerun on another thread count can move passes: a paired difference of accuracies 0.002 off (an
    # accuracy, 0.02 absolute) and a zstd-coded upload size half a byte off (1% relative)
    m04, m06 = ref["metrics"]["04_federated_run"], ref["metrics"]["06_communication"]
    m04[next(p for p in m04 if p.startswith("paired_differences.") and p.endswith(".normalised.mean"))]["value"] += (
        0.002
    )
    m06[next(p for p in m06 if "top-" in p and p.endswith(".up_bytes_per_client_round"))]["value"] += 0.5
    perturbed = tmp_path / "perturbed.json"
    perturbed.write_text(json.dumps(ref))
    capsys.readouterr()
    assert workbook.main(["--check", str(perturbed), "--out", str(out), "--reuse"]) == 1
    printed = capsys.readouterr().out
    assert "2 of" in printed and "metrics drifted" in printed
    drifted = [line for line in printed.splitlines() if line.endswith("| DRIFT |")]
    assert {line.split("|")[2].strip() for line in drifted} == {
        "methods.matu.mean_acc",
        "methods.matu.bytes_up_per_round",
    }
    page = (out / "index.html").read_text()
    assert '<p class="bad">2 of' in page and "methods.matu.mean_acc" in page and "x its tolerance 0.02)" in page
    assert "FAILED" not in page
    # the unperturbed reference still passes on the same files
    assert workbook.main(["--check", str(REFERENCE), "--out", str(out), "--reuse"]) == 0


def test_report_is_worth_forwarding(smoke_run):
    _, out = smoke_run
    page = (out / "index.html").read_text()
    assert "<h2>Headline" in page and "<td>matu</td>" in page.replace("<b>", "").replace("</b>", "")
    assert page.count('src="data:image/png;base64,') == len(workbook.NOTEBOOKS)  # one key figure each
    for name in workbook.NOTEBOOKS:
        assert f'href="{name}/{name}.html"' in page and (out / name / f"{name}.html").exists()
    assert "Package versions" in page and "torch" in page and "Configuration" in page and "local_steps" in page
    assert "passed: all" in page
