"""The aggregation benchmark runs end to end at a tiny size and reports each operator against paired copy floors."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_aggregation  # noqa: E402


def test_paired_ratio_is_the_median_of_each_run_over_its_own_floor():
    # runs 2, 4, 9 s after floors of 1, 1, 3 s: ratios 2, 4, 3 -> median 3 (the ratio of medians would be 4)
    assert bench_aggregation.paired_text([2.0, 4.0, 9.0], [1.0, 1.0, 3.0]).startswith("3.00x")


def test_benchmark_reports_every_operator_against_its_paired_floor():
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_aggregation.py"),
            "--n",
            "4",
            "--params",
            "50000",
            "--backend",
            "both",
            "--repeats",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        check=True,
    ).stdout
    operators = re.findall(r"^(unify|server round) \[(\w+)", out, flags=re.M)
    assert operators == [
        ("unify", "torch"),
        ("unify", "numba"),
        ("server round", "torch"),
        ("server round", "numba"),
        ("server round", "numba"),
    ]
    paired = re.findall(r"^ +([\d.]+)x the copy_ floor timed before each run \(median of ([\d., ]+)\)", out, flags=re.M)
    assert len(paired) == len(operators)
    for median, runs in paired:
        ratios = [float(r) for r in runs.split(", ")]
        assert len(ratios) in (1, 2) and all(r > 0 for r in ratios)
        assert min(ratios) <= float(median) <= max(ratios)
