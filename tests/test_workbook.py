"""The workbook's runner without running notebooks: parameters, regression comparison, progress, findings, chance."""

import io
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import pytest

from matu_lib import regression, workbook
from matu_lib.findings import direction, findings_markdown, ratio_words
from matu_lib.plots import chance_jaccard

METRICS = {
    "04_federated_run": {
        "rounds": 2,
        "table_markdown": "| a |",
        "methods": {
            "matu": {"mean_acc": 0.46, "bytes_up_per_round": 5_740_000, "acc": {"mnist": 0.8}},
        },
    },
    "01_task_vector_geometry": {
        "cosine": [[1.0, 0.2], [0.2, 1.0]],
        "norms": {"mnist": 2.0},
        "tasks": ["mnist", "textures"],
        "negation": {"target_acc": [0.9, 0.5, 0.1]},
        "matu_folder": "/tmp/x",
        "ari_cosine": 0.5,
        "interference": {"alpha": 0.3, "ok": True},
    },
}


def _reference():
    return regression.make_reference(
        METRICS,
        preset="smoke",
        seed=0,
        parameters={"OVERRIDES": {"rounds": 1}},
        timings={"04_federated_run": 10.0, "01_task_vector_geometry": 5.0},
        cells={"04_federated_run": 20, "01_task_vector_geometry": 25},
    )


def test_flatten_keeps_numbers_and_drops_matrices_strings_and_paths():
    flat = regression.flatten(METRICS["01_task_vector_geometry"])
    assert flat == {
        "norms.mnist": 2.0,
        "negation.target_acc[0]": 0.9,
        "negation.target_acc[1]": 0.5,
        "negation.target_acc[2]": 0.1,
        "ari_cosine": 0.5,
        "interference.alpha": 0.3,
        "interference.ok": True,
    }


@pytest.mark.parametrize(
    "path, value, kind, tol",
    [
        ("methods.matu.bytes_up_per_round", 5_740_000.0, "exact", 0.0),
        ("rounds", 2.0, "exact", 0.0),
        ("methods.matu.mean_acc", 0.46, "accuracy", 0.02),
        ("norms.mnist", 2.0, "magnitude", 0.04),
        ("ari_cosine", 0.5, "ari", 0.2),
        ("within_cosine", 0.3, "similarity", 0.02),
        ("interference.ok", True, "exact", 0.0),
        # a normalised accuracy is an accuracy, not a norm
        ("methods.matu.mean_normalised", 0.8, "accuracy", 0.02),
        ("over_seeds.matu.mean_normalised[0]", 0.8, "accuracy", 0.02),
        # differences of accuracies, their means and interval ends are in accuracy units, even near zero
        ("paired_differences.tall_masks.normalised.mean", 0.00057, "accuracy", 0.02),
        ("paired_differences.tall_masks.normalised.ci[1]", 0.00284, "accuracy", 0.02),
        ("paired_differences.tall_masks.acc.per_seed[2]", -0.01, "accuracy", 0.02),
        ("negation_drop", 0.86, "accuracy", 0.02),
        ("negation.control_change", -0.188, "accuracy", 0.02),
        ("reference.mnist", 0.846, "accuracy", 0.02),
        ("paired_differences.tall_masks.acc.n_boot", 10_000.0, "exact", 0.0),
        # top-k coded sizes move by fractions of a byte; raw float32 and bit-packed sizes do not
        ("coding.matu/1-bit top-25% up, 8-bit down.up_bytes_per_client_round", 58563.1, "coded", 585.631),
        ("coding.matu/1-bit top-25% up, 8-bit down.up_bits_per_param_per_task", 0.52, "coded", 0.0052),
        ("coding.matu/float32.up_bytes_per_client_round", 5318984.5, "exact", 0.0),
        ("coding.matu/float32.up_bits_per_param_per_task", 9.0, "exact", 0.0),
        ("bytes_up_per_round.matu.masks", 215680.0, "exact", 0.0),
        ("retention_by_size[3].params", 824576.0, "exact", 0.0),
        ("seed", 1.0, "exact", 0.0),
    ],
)
def test_default_tolerances_by_kind(path, value, kind, tol):
    assert regression.tolerance_for(path, value) == (kind, pytest.approx(tol))


def test_coded_sizes_are_exactly_the_top_k_settings_of_the_communication_study():
    """Only a top-k setting sends a zstd-coded bitmap, whose length follows the values; every other setting's
    payload has a fixed size, so its byte counts stay exact."""
    from matu_lib.communication_study import SETTINGS

    for name, overrides in SETTINGS.items():
        top_k = overrides.get("upload_topk", 1.0) < 1 or overrides.get("download_topk", 1.0) < 1
        for leaf in ("up_bytes_per_client_round", "down_bytes_per_client_round", "up_bits_per_param_per_task"):
            kind, _ = regression.tolerance_for(f"coding.matu/{name}.{leaf}", 1000.0)
            assert kind == ("coded" if top_k else "exact"), (name, leaf)


def test_committed_references_carry_the_default_tolerances():
    """Tolerances are stored at record time; the committed files must hold what the rules give today."""
    for name in ("smoke", "cpu"):
        ref = regression.load_reference(workbook.REFERENCE_DIR / f"{name}.json")
        stored, default = (
            {(nb, path): (e["kind"], e["tolerance"]) for nb, m in r["metrics"].items() for path, e in m.items()}
            for r in (ref, regression.retolerate(ref))
        )
        assert stored == default, f"{name}.json: re-tolerate it with regression.retolerate"


def test_retolerate_keeps_values_and_resets_every_tolerance():
    ref = _reference()
    entry = ref["metrics"]["04_federated_run"]["methods.matu.mean_acc"]
    entry["tolerance"], entry["kind"] = 0.5, "loosened"
    nan = regression.make_reference(
        {"n": {"acc": math.nan}}, preset="smoke", seed=0, parameters={}, timings={}, cells={}
    )["metrics"]
    ref["metrics"] |= nan
    again = regression.retolerate(ref)
    assert again["metrics"]["04_federated_run"]["methods.matu.mean_acc"] == {
        "value": 0.46,
        "tolerance": 0.02,
        "kind": "accuracy",
    }
    assert math.isnan(again["metrics"]["n"]["acc"]["value"]) and again["metrics"]["n"]["acc"]["tolerance"] == 0.02
    assert entry["tolerance"] == 0.5  # the input is left as it was


@pytest.mark.parametrize("name", ["smoke", "cpu"])
def test_committed_reference_still_catches_real_drift_and_only_that(name):
    """The committed reference's own values as a run: shifts a rerun on another thread count can make pass
    (a coded size half a byte off, a paired difference 0.002 off), real changes fail (an accuracy 0.05 off, one
    byte more of a fixed-size payload), and the verdict says how far each is in tolerances."""
    ref = regression.load_reference(workbook.REFERENCE_DIR / f"{name}.json")
    run = {nb: {path: e["value"] for path, e in m.items()} for nb, m in ref["metrics"].items()}
    assert all(r.status == "ok" for r in regression.compare(ref, run))
    m04, m06 = run["04_federated_run"], run["06_communication"]
    paired = next(p for p in m04 if p.startswith("paired_differences.") and p.endswith(".normalised.mean"))
    coded = next(p for p in m06 if "top-" in p and p.endswith(".up_bytes_per_client_round"))
    normalised = ref["metrics"]["04_federated_run"]["methods.matu.mean_normalised"]
    assert (normalised["kind"], normalised["tolerance"]) == ("accuracy", 0.02)
    m04[paired] += 0.002
    m06[coded] += 0.5
    m04["methods.matu.mean_acc"] += 0.05
    m04["methods.matu.bytes_up_per_round"] += 1
    rows = regression.compare(ref, run)
    assert {(r.notebook, r.metric) for r in rows if r.failed} == {
        ("04_federated_run", "methods.matu.mean_acc"),
        ("04_federated_run", "methods.matu.bytes_up_per_round"),
    }
    line = regression.verdict(rows, f"{name}.json")
    assert line.startswith(
        f"2 of {len(rows)} metrics drifted from {name}.json: 04_federated_run methods.matu.bytes_up_per_round "
    )  # the worst first: any change of an exact metric
    assert "(off by 1; exact: tolerance 0)" in line and "(2.5x its tolerance 0.02)" in line


def test_verdict_names_what_drifted_and_how_far():
    ref = _reference()
    rows = regression.compare(ref, METRICS)
    assert regression.verdict(rows, "ref.json") == f"passed: all {len(rows)} metrics within tolerance of ref.json"
    drifted = json.loads(json.dumps(METRICS))
    drifted["04_federated_run"]["methods"]["matu"]["acc"]["mnist"] += 0.03
    drifted["01_task_vector_geometry"]["interference"]["ok"] = False
    del drifted["01_task_vector_geometry"]["ari_cosine"]
    rows = regression.compare(ref, drifted)
    line = regression.verdict(rows, "ref.json", limit=2)
    assert line.startswith(
        f"3 of {len(rows)} metrics drifted from ref.json: 01_task_vector_geometry ari_cosine is "
        "missing from this run (reference 0.5); 01_task_vector_geometry interference.ok False vs True"
    )
    assert line.endswith("; 1 more in the table")
    mnist = next(r for r in rows if r.metric == "methods.matu.acc.mnist")
    assert mnist.excess == pytest.approx(1.5)
    assert (
        regression.describe(mnist)
        == "04_federated_run methods.matu.acc.mnist 0.83 vs 0.8 in the reference (1.5x its tolerance 0.02)"
    )


def test_identical_run_passes_and_every_drift_fails():
    ref = _reference()
    rows = regression.compare(ref, METRICS)
    assert rows and all(r.status == "ok" for r in rows)
    assert regression.summary(rows)["passed"]

    drifted = json.loads(json.dumps(METRICS))
    drifted["04_federated_run"]["methods"]["matu"]["mean_acc"] += 0.021  # beyond 0.02
    drifted["04_federated_run"]["methods"]["matu"]["acc"]["mnist"] += 0.019  # within 0.02
    drifted["04_federated_run"]["methods"]["matu"]["bytes_up_per_round"] += 1  # exact
    drifted["01_task_vector_geometry"]["interference"]["ok"] = False
    del drifted["01_task_vector_geometry"]["norms"]
    drifted["01_task_vector_geometry"]["new_metric"] = 1.0
    rows = {(r.notebook, r.metric): r for r in regression.compare(ref, drifted)}
    assert rows["04_federated_run", "methods.matu.mean_acc"].status == "DRIFT"
    assert rows["04_federated_run", "methods.matu.acc.mnist"].status == "ok"
    assert rows["04_federated_run", "methods.matu.bytes_up_per_round"].status == "DRIFT"
    assert rows["01_task_vector_geometry", "interference.ok"].status == "DRIFT"
    assert rows["01_task_vector_geometry", "norms.mnist"].status == "missing"
    assert (
        rows["01_task_vector_geometry", "new_metric"].status == "new"
        and not rows["01_task_vector_geometry", "new_metric"].failed
    )
    s = regression.summary(list(rows.values()))
    assert not s["passed"] and s["failed"] == 4
    table = regression.table(list(rows.values()), only_failed=True).splitlines()
    assert table[0] == "| notebook | metric | reference | now | tolerance | ok |" and len(table) == 2 + 4


def test_reference_records_cpu_time_and_machine_state():
    machine = {"start": workbook.machine_state(), "end": workbook.machine_state()}
    assert machine["start"]["cpus"] >= 1 and len(machine["start"]["load_average"]) == 3
    ref = regression.make_reference(
        METRICS, preset="smoke", seed=0, parameters={}, timings={"a": 10.04}, cells={}, cpu={"a": 4.26}, machine=machine
    )
    assert ref["cpu_s"] == {"a": 4.3} and ref["timings_s"] == {"a": 10.0} and ref["machine"] == machine


def test_children_cpu_time_counts_a_finished_child():
    import subprocess
    import sys

    before = workbook.children_cpu_s()
    subprocess.run(
        [sys.executable, "-c", "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.5: pass"],
        check=True,
    )
    assert workbook.children_cpu_s() - before >= 0.45


def test_nan_matches_only_nan():
    ref = regression.make_reference(
        {"n": {"acc": math.nan}}, preset="smoke", seed=0, parameters={}, timings={}, cells={}
    )
    assert regression.compare(ref, {"n": {"acc": math.nan}})[0].status == "ok"
    assert regression.compare(ref, {"n": {"acc": 0.5}})[0].status == "DRIFT"


def test_load_reference_refuses_bad_files_in_one_line(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        regression.load_reference(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        regression.load_reference(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"format": "x"}))
    with pytest.raises(ValueError, match="is not a matu-workbook-reference/1 file"):
        regression.load_reference(tmp_path / "other.json")
    good = tmp_path / "good.json"
    good.write_text(json.dumps(_reference()))
    assert regression.load_reference(good)["parameters"] == {"OVERRIDES": {"rounds": 1}}


def test_committed_smoke_reference_covers_every_notebook_with_valid_parameters():
    ref = regression.load_reference(workbook.REFERENCE_DIR / "smoke.json")
    assert ref["preset"] == "smoke" and set(ref["metrics"]) == set(workbook.NOTEBOOKS)
    assert set(ref["timings_s"]) == set(workbook.NOTEBOOKS) and all(t > 0 for t in ref["timings_s"].values())
    assert ref["packages"]["torch"] and all(len(m) >= 5 for m in ref["metrics"].values())
    workbook.check_parameters(ref["parameters"], workbook.NOTEBOOKS)  # still valid for today's notebooks


# ------------------------------------------------------------------------------------ parameters


def test_parse_value_reads_literals_like_papermill():
    assert workbook.parse_value("3") == 3 and workbook.parse_value("0.5") == 0.5
    assert workbook.parse_value("True") is True and workbook.parse_value("None") is None
    assert workbook.parse_value('["matu", "fedavg"]') == ["matu", "fedavg"]
    assert workbook.parse_value("matu") == "matu"


def test_parameters_are_checked_against_the_parameters_cells():
    names = ("04_federated_run", "05_ablations")
    overrides = {"rounds": 1, "transfer": True}
    split = workbook.check_parameters({"OVERRIDES": overrides, "METHODS": ["matu"]}, names)
    assert split == {
        "04_federated_run": {"OVERRIDES": overrides, "METHODS": ["matu"]},
        "05_ablations": {"OVERRIDES": overrides},
    }
    with pytest.raises(ValueError, match=r"-p OVERRIDES: rounds must be an integer, got 'two'"):
        workbook.check_parameters({"OVERRIDES": {"rounds": "two"}}, names)
    with pytest.raises(ValueError, match=r"-p OVERRIDES: unknown config keys \['round'\]"):
        workbook.check_parameters({"OVERRIDES": {"round": 1}}, names)
    with pytest.raises(ValueError, match="-p OVERRIDES: OVERRIDES must be a dict"):
        workbook.check_parameters({"OVERRIDES": "rounds=1"}, names)
    with pytest.raises(ValueError, match="unknown notebook parameter 'ROUND'"):
        workbook.check_parameters({"ROUND": 1}, names)
    with pytest.raises(ValueError, match="METHODS='matu' has type str, but 04_federated_run expects list"):
        workbook.check_parameters({"METHODS": "matu"}, names)
    with pytest.raises(ValueError, match="use --seed"):
        workbook.check_parameters({"SEED": 1}, names)
    with pytest.raises(ValueError, match="unknown notebook parameter 'ABLATION_AXES'"):
        workbook.check_parameters({"ABLATION_AXES": []}, ("04_federated_run",))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["-p", "NOPE", "1"], "unknown notebook parameter 'NOPE'"),
        (["-p", "ROUNDS", "2"], "unknown notebook parameter 'ROUNDS'"),
        (["-p", "OVERRIDES", "{'rounds': 2.5}"], "rounds must be an integer, got 2.5"),
        (["-p", "OVERRIDES", "{'transfer': 'yes'}"], "transfer must be true or false"),
        (["-p", "SIZE_STEPS", "four"], "SIZE_STEPS='four' has type str"),
        (["--preset", "cpux"], "unknown preset 'cpux'"),
        (["--only", "99_missing"], "no such notebooks"),
        (["--check", "/nonexistent/ref.json"], "does not exist"),
        (["--seed", "-1"], "seed must be an integer in [0, 4294967295], got -1"),
        (["-p", "OVERRIDES", "{'model': 'nosuchmodel'}"], "model='nosuchmodel' is not a known model"),
        (["-p", "OVERRIDES", "{'pretrained': 'missing.pt'}"], "pretrained='missing.pt': no such file"),
        (["-p", "OVERRIDES", "{'device': 'cuda'}"], "device='cuda' needs a CUDA GPU, and this machine has none"),
        (["-p", "OVERRIDES", "{'n_clients': 100000}"], "n_clients=100000 with tasks_per_client (2, 2) needs"),
        (["-p", "OVERRIDES", "{'max_train_per_task': -5}"], "max_train_per_task must be none (no cap) or >= 1"),
        (["--record", "/dev/null/ref.json"], "--record: /dev/null is a file, not a folder"),
        (["--record", "/"], "--record: / is a folder"),
    ],
)
def test_cli_refuses_bad_input_before_running_anything(monkeypatch, capsys, argv, message):
    import torch

    def must_not_run(*args, **kwargs):
        raise AssertionError("a notebook ran despite bad input")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answer on a machine with a GPU
    monkeypatch.setattr(workbook, "run_all", must_not_run)
    assert workbook.main(["--preset", "smoke", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_record_below_an_unwritable_folder_is_refused_before_the_run(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(workbook, "run_all", lambda *a, **k: pytest.fail("ran"))
    locked, access = tmp_path / "locked", os.access
    locked.mkdir()
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != locked and access(path, mode))  # also as root
    assert workbook.main(["--preset", "smoke", "--record", str(locked / "sub" / "ref.json")]) == 2
    assert capsys.readouterr().err.strip() == f"error: --record: cannot write to {locked}; choose another --record path"


def test_a_workbook_far_beyond_its_preset_says_so_before_it_starts(monkeypatch, capsys):
    class Started(Exception):
        pass

    def started(*args, **kwargs):
        raise Started

    monkeypatch.setattr(workbook, "run_all", started)
    with pytest.raises(Started):
        workbook.main(["--preset", "smoke", "-p", "OVERRIDES", "{'rounds': 100000000}", "--only", "00_quickstart"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: this run asks for 100,000,000x the smoke preset's training")


def test_check_refuses_conditions_that_differ_from_the_reference(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(workbook, "run_all", lambda *a, **k: pytest.fail("ran"))
    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps(_reference()))
    assert workbook.main(["--check", str(ref), "--preset", "cpu"]) == 2
    assert "differs from the reference's 'smoke'" in capsys.readouterr().err
    assert workbook.main(["--check", str(ref), "-p", "OVERRIDES", "{'rounds': 3}"]) == 2
    assert "-p OVERRIDES {'rounds': 3} differs from the reference's {'rounds': 1}" in capsys.readouterr().err
    assert workbook.main(["--check", str(ref), "-p", "METHODS", '["matu"]']) == 2
    assert "differs from the reference's 'unset'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ progress


def test_progress_estimates_from_reference_timings_scaled_by_measured_speed():
    names = ("a", "b", "c")
    stream = io.StringIO()
    p = workbook.Progress(names, {"a": 100.0, "b": 50.0, "c": 10.0}, stream=stream, log_every=3600)
    try:
        p.start("a", 10)
        assert p.remaining_s() == pytest.approx(160.0, abs=1.0)  # nothing measured yet: the reference as is
        p.cell(4, 10)
        p.finish("a")
        p.done_s["a"] = 200.0  # this machine took twice the reference's time
        p.start("b", 5)
        assert p.remaining_s() == pytest.approx(2 * 50 + 2 * 10, abs=1.0)
        assert "[2/3] b: cell 0/5" in p.line() and "left in all" in p.line()
    finally:
        p.close()
    assert "[1/3] a done in" in stream.getvalue()
    assert workbook.Progress(names, {}, stream=io.StringIO()).remaining_s() is None


def test_progress_log_is_quiet_between_lines():
    """In a log, a notebook that starts after a long pause is not announced twice (one line, then one per interval)."""
    stream = io.StringIO()
    p = workbook.Progress(("a", "b"), {}, stream=stream, log_every=1.0)
    try:
        p.start("a", 3)
        p.finish("a")
        time.sleep(1.6)  # longer than log_every, nothing running
        p.start("b", 3)
        time.sleep(0.6)
        assert sum(line.startswith("[2/2] b: cell") for line in stream.getvalue().splitlines()) == 1
        time.sleep(1.5)
        assert sum(line.startswith("[2/2] b: cell") for line in stream.getvalue().splitlines()) == 2
    finally:
        p.close()


# ------------------------------------------------------------------------------------ prose helpers


def test_findings_words_follow_the_numbers():
    assert direction(0.46, 0.31) == "above" and direction(0.30, 0.31) == "below"
    assert direction(0.312, 0.31) == "level with"
    assert direction(float("nan"), 0.3) == "not comparable with"
    assert ratio_words(5.74, 5.18) == "1.11x (11% more than)"
    assert ratio_words(5.18, 18.12).endswith("(71% less than)")
    md = findings_markdown("What we found", ["MaTU {acc:.3f}, {vs} zero-shot"], acc=0.4567, vs=direction(0.4567, 0.31))
    assert md == "### What we found\n\n- MaTU 0.457, above zero-shot\n"


def test_chance_jaccard_matches_independent_random_masks():
    rng = np.random.default_rng(0)
    for p, q in ((0.6, 0.6), (0.3, 0.8), (0.05, 0.5)):
        a, b = rng.random(200_000) < p, rng.random(200_000) < q
        measured = (a & b).sum() / (a | b).sum()
        assert chance_jaccard(p, q) == pytest.approx(measured, abs=0.005)
    assert chance_jaccard(0.6, 0.6) == pytest.approx(0.36 / 0.84)


# ------------------------------------------------------------------------------------ report


def test_report_index_carries_headline_figure_timings_config_versions_and_check(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matu_lib import report

    name = "04_federated_run"
    (tmp_path / name).mkdir()
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [0, 1])
    fig.savefig(tmp_path / name / report.KEY_FIGURES[name])
    plt.close(fig)
    metrics = {name: {"table_markdown": "| method | acc |\n|---|---|\n| **matu** | 0.46 |\n| fedavg | 0.37 |"}}
    ref = regression.make_reference(
        {name: {"m": {"acc": 0.5}}}, preset="smoke", seed=0, parameters={}, timings={}, cells={}
    )
    rows = regression.compare(ref, {name: {"m": {"acc": 0.9}}})
    check = {"reference": "ref.json", "summary": regression.summary(rows), "rows": rows}
    result = {
        "metrics": metrics,
        "timings_s": {name: 61.0},
        "total_s": 61.0,
        "out": tmp_path,
        "cpu_s": {name: 40.2},
        "machine": {"start": {"cpus": 2, "load_average": [0.1, 0.2, 0.3]}},
    }
    page = report.write_index(
        tmp_path, result, preset="smoke", seed=0, parameters={"OVERRIDES": {"rounds": 1}}, check=check
    ).read_text()
    assert "<tr><td><b>matu</b></td><td>0.46</td></tr>" in page and "<th>method</th>" in page
    assert page.count('src="data:image/png;base64,') == 1 and f'href="{name}/{name}.html"' in page
    assert "<td>04_federated_run</td><td>61 s (kernel CPU 40 s)</td>" in page
    assert "Machine: start {&#x27;cpus&#x27;: 2, &#x27;load_average&#x27;: [0.1, 0.2, 0.3]}" in page
    assert (
        "local_steps" in page and "{&#x27;OVERRIDES&#x27;: {&#x27;rounds&#x27;: 1}}" in page
    )  # configuration, escaped
    assert "<tr><td>rounds</td><td>1</td></tr>" in page  # the overrides reach the configuration shown (smoke: 2)
    assert "torch" in page and "Package versions" in page
    assert (
        '<p class="bad">1 of 1 metrics drifted from ref.json: 04_federated_run m.acc 0.9 vs 0.5 in the reference '
        "(20.0x its tolerance 0.02)</p>"
    ) in page and "FAILED" not in page


def _finished_folder(out, preset="smoke", seed=0, overrides=None, record=True):
    """A workbook folder as ``run_all`` leaves it for the two notebooks of ``METRICS``, run with these values."""
    for name, metrics in METRICS.items():
        params = {"PRESET": preset, "SEED": seed, "SHARED_DIR": str(out / "shared"), "OUTPUT_DIR": str(out / name)}
        if overrides is not None:
            params["OVERRIDES"] = overrides
        meta = {"papermill": {"parameters": params, "duration": 1.0}} if record else {}
        (out / name).mkdir(parents=True, exist_ok=True)
        (out / name / f"{name}.ipynb").write_text(json.dumps({"cells": [], "metadata": meta}))
        (out / name / "metrics.json").write_text(json.dumps(metrics))


@pytest.mark.parametrize(
    "ran, message",
    [
        ({"preset": "cpu"}, "ran with PRESET='cpu', this command asks for PRESET='smoke'"),
        ({"seed": 1}, "ran with SEED=1, this command asks for SEED=0"),
        (
            {"overrides": {"rounds": 2}},
            "ran with OVERRIDES={'rounds': 2}, this command asks for OVERRIDES={'rounds': 1}",
        ),
        ({"overrides": None}, "ran with OVERRIDES={}, this command asks for OVERRIDES={'rounds': 1}"),
        ({"record": False}, "has no papermill record of its parameters"),
    ],
)
def test_reuse_refuses_a_folder_that_ran_with_other_conditions(monkeypatch, capsys, tmp_path, ran, message):
    """``--reuse`` with ``--check`` or ``--record`` reads numbers only from a folder run as the command asks."""
    monkeypatch.setattr(workbook, "run_all", lambda *a, **k: pytest.fail("ran"))
    ref, out, names = tmp_path / "ref.json", tmp_path / "wb", list(METRICS)
    ref.write_text(json.dumps(_reference()))
    _finished_folder(out, **({"overrides": {"rounds": 1}} | ran))
    assert workbook.main(["--check", str(ref), "--reuse", "--out", str(out), "--only", *names]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and not (out / "regression.md").exists()
    record = tmp_path / "new.json"
    assert (
        workbook.main(
            [
                "--preset",
                "smoke",
                "-p",
                "OVERRIDES",
                "{'rounds': 1}",
                "--reuse",
                "--out",
                str(out),
                "--record",
                str(record),
                "--only",
                *names,
            ]
        )
        == 2
    )
    assert message in capsys.readouterr().err and not record.exists()


def test_reuse_reads_a_folder_that_ran_as_asked(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(workbook, "run_all", lambda *a, **k: pytest.fail("ran"))
    ref, out = tmp_path / "ref.json", tmp_path / "wb"
    ref.write_text(json.dumps(_reference()))
    _finished_folder(out, overrides={"rounds": 1})
    assert workbook.main(["--check", str(ref), "--reuse", "--out", str(out), "--only", *METRICS]) == 0
    assert "all" in capsys.readouterr().out and (out / "regression.md").exists()
