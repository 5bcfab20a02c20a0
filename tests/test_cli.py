"""The command line: seeds, default folders, the multi-seed summary and the committed results file."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from matu_lib.__main__ import main
from matu_lib.presets import default_folder


def test_default_folders_keep_seeds_and_overrides_apart():
    assert default_folder("cpu", {}) == Path("results/cpu")
    assert default_folder("cpu", {"rounds": 3, "tasks_per_client": (2, 4)}) == Path(
        "results/cpu/rounds=3-tasks_per_client=2x4"
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--seeds", "0", "0"], "--seeds must be distinct"),
        (["--set", "seed=3"], "not --set seed="),
        (["--methods", "matu", "nope"], "unknown methods ['nope']"),
        (["--results", "out.txt"], "ending in .md"),
        (["--set", "no_such_key=1"], "unknown config keys ['no_such_key']"),
    ],
)
def test_bad_arguments_fail_in_one_line_before_any_work(tmp_path, capsys, argv, message):
    assert main(["compare", "--preset", "smoke", "--out", str(tmp_path / "r"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_set_reads_literals_but_keeps_a_text_option_as_written():
    from matu_lib.presets import parse_overrides

    parsed = parse_overrides(
        ["fill_dropped=none", "sketch_center=none", "pretrained=none", "rounds=3", "transfer=true"]
    )
    assert parsed == {
        "fill_dropped": "none",
        "sketch_center": "none",
        "pretrained": None,
        "rounds": 3,
        "transfer": True,
    }


def test_seed_and_seeds_are_exclusive(capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--preset", "smoke", "--seed", "1", "--seeds", "0", "1"])
    assert "not allowed with argument" in capsys.readouterr().err


@pytest.mark.slow  # two seeds x (individual + matu), one round of one step, then the same command again: ~1 min
def test_compare_over_seeds_writes_summary_and_results_file_and_resumes(tmp_path, capsys):
    out, results = tmp_path / "runs", tmp_path / "data" / "results" / "smoke.md"
    argv = [
        "compare",
        "--preset",
        "smoke",
        "--seeds",
        "0",
        "1",
        "--methods",
        "matu",
        "--set",
        "rounds=1",
        "--set",
        "local_steps=1",
        "--out",
        str(out),
        "--results",
        str(results),
        "--bootstrap",
        "500",
    ]
    assert main(argv) == 0
    capsys.readouterr()
    finished = sorted(out.glob("seed*/*/metrics.json"))
    assert [p.relative_to(out).as_posix() for p in finished] == [
        f"seed{s}/{m}/metrics.json" for s in (0, 1) for m in ("individual", "matu")
    ]
    per_seed = {
        s: {r["method"]: r for r in json.loads((out / f"seed{s}" / "summary.json").read_text())} for s in (0, 1)
    }
    assert json.loads((out / "seed1" / "matu" / "config.json").read_text())["seed"] == 1

    summary = json.loads(results.with_suffix(".json").read_text(), parse_constant=pytest.fail)  # strict JSON
    assert summary["seeds"] == [0, 1] and summary["command"].startswith("python -m matu_lib compare --preset smoke")
    assert summary == json.loads((out / "summary.json").read_text()) | {"command": summary["command"]}
    # the aggregate is the per-seed runs' numbers: mean and sd of the two seeds, paired differences per seed
    matu = [per_seed[s]["matu"]["mean_acc"] for s in (0, 1)]
    assert summary["methods"]["matu"]["mean_acc"] == pytest.approx(
        [sum(matu) / 2, abs(matu[0] - matu[1]) / math.sqrt(2)]
    )
    ind = [per_seed[s]["individual"]["mean_acc"] for s in (0, 1)]
    assert summary["differences"]["individual"]["acc"]["per_seed"] == pytest.approx([m - i for m, i in zip(matu, ind)])
    text = results.read_text()
    assert text.startswith("# MaTU against the baselines: `smoke` preset, seeds 0, 1")
    assert "| **matu** |" in text and "| individual (reference) |" in text and "## Per task: normalised" in text
    assert "Written by `python -m matu_lib compare" in text

    before = {p: p.stat().st_mtime_ns for p in finished}
    assert main(argv) == 0  # the same command again: every run reused, the same numbers written
    assert {p: p.stat().st_mtime_ns for p in finished} == before
    assert results.read_text() == text


def test_study_results_files_are_strict_json_beside_the_table(tmp_path, capsys):
    from matu_lib.comparison import publish

    numbers = {"mean": float("nan"), "pair": (1, 2), "scale": np.float64(0.5)}
    assert publish("| table |\n", numbers, tmp_path / "out" / "study.md") == 0
    assert (tmp_path / "out" / "study.md").read_text() == "| table |\n"
    back = json.loads((tmp_path / "out" / "study.json").read_text(), parse_constant=pytest.fail)
    assert back == {"mean": None, "pair": [1, 2], "scale": 0.5}
    assert "results file:" in capsys.readouterr().out
    with pytest.raises(ValueError, match="must end in .md"):
        publish("x", {}, tmp_path / "study.txt")
    assert not (tmp_path / "study.txt").exists()


@pytest.mark.parametrize("module", ["ablations", "communication_study"])
@pytest.mark.parametrize(
    "pairs, message",
    [
        (["seed=3"], "--set cannot set ['seed']"),
        (["eval_split=test"], "--set cannot set ['eval_split']"),
        (["no_such_key=1"], "unknown config keys ['no_such_key']"),
        (["fill_dropped=zeros"], "fill_dropped must be one of"),
    ],
)
def test_study_commands_refuse_bad_overrides_in_one_line_before_any_work(tmp_path, capsys, module, pairs, message):
    import importlib

    study = importlib.import_module(f"matu_lib.{module}")
    head = ["validate"] if module == "ablations" else []
    argv = [*head, "--preset", "smoke", "--seeds", "0", "--out", str(tmp_path / "r")]
    for pair in pairs:
        argv += ["--set", pair]
    assert study.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "r").exists()
