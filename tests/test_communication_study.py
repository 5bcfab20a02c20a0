"""The communication study's summary: normalisation, fractions, Pareto flags, same-budget pairs, the choice."""

from types import SimpleNamespace

import pytest

from matu_lib.communication_study import choose_setting, format_study, slug, summarise_study
from matu_lib.presets import preset

TASKS = ("a", "b")
CHANCE = {"a": 0.5, "b": 0.5}
REF = {"a": 0.9, "b": 0.7}  # individual: 0.4 and 0.2 above chance
SETTINGS = {"float32": {}, "cheap": {"upload_bits": 1, "upload_topk": 0.25}}


def _run(acc: dict, up: int, clients: int = 2):
    history = [
        {
            "sampled": list(range(clients)),
            "bytes_up": {"total": up * clients},
            "bytes_down": {"total": up * clients},
            "server_seconds": 0.5,
        }
    ]
    return SimpleNamespace(final={"acc": acc}, history=history)


def _per_seed(shift: float):
    # (method, setting) -> (accuracy of a, of b, upload per client and round)
    table = {
        ("matu", "float32"): (0.80, 0.65, 1000),
        ("matu", "cheap"): (0.78, 0.64, 100),
        ("per_task_fedavg", "float32"): (0.86, 0.66, 4000),
        ("per_task_fedavg", "cheap"): (0.70, 0.60, 300),
    }
    runs = {k: _run({"a": a + shift, "b": b}, up) for k, (a, b, up) in table.items()}
    return {"reference": REF, "runs": runs, "chance": CHANCE, "n_params": 1000, "tasks_per_client": 2.0}


def test_summary_normalises_pairs_and_flags_the_frontier():
    summary = summarise_study(
        {0: _per_seed(0.0), 1: _per_seed(0.02)}, SETTINGS, ["matu", "per_task_fedavg"], preset("smoke"), n_boot=200
    )
    rows = {(r["method"], r["setting"]): r for r in summary["rows"]}
    m32, mc, p32, pc = (
        rows[k]
        for k in [("matu", "float32"), ("matu", "cheap"), ("per_task_fedavg", "float32"), ("per_task_fedavg", "cheap")]
    )
    # chance-corrected: seed 0 MaTU float32 = mean((0.8-0.5)/0.4, (0.65-0.5)/0.2) = 0.75; seed 1 (a + 0.02): 0.775
    assert m32["mean_normalised"][0] == pytest.approx((0.75 + 0.775) / 2)
    assert m32["up_bits_per_param_per_task"] == pytest.approx(8 * 1000 / (1000 * 2))
    assert mc["up_fraction_of_per_task_fedavg"] == pytest.approx(100 / 4000)
    # setting minus float32 MaTU, paired: cheap loses (0.78-0.8)/0.4 and (0.64-0.65)/0.2 -> mean -0.05
    assert mc["minus_matu_float32"]["normalised"]["mean"] == pytest.approx(-0.05)
    assert m32["pareto"] and mc["pareto"] and p32["pareto"] and pc["pareto"]
    # same budget: MaTU's cheap setting (100 B) has no per-task FedAvg setting as cheap; per-task's cheap (300 B)
    # meets MaTU's best setting within 300 B (cheap) and the difference is MaTU minus per-task FedAvg
    assert "same_budget" not in mc
    assert pc["same_budget"]["setting"] == "cheap" and pc["same_budget"]["other"] == "matu"
    expected = ((0.78 - 0.70) / 0.4 + (0.64 - 0.60) / 0.2) / 2
    assert pc["same_budget"]["normalised"]["mean"] == pytest.approx(expected)
    assert m32["same_budget"]["setting"] == "cheap" and m32["same_budget"]["normalised"]["mean"] == pytest.approx(
        ((0.80 - 0.70) / 0.4 + (0.65 - 0.60) / 0.2) / 2
    )
    # the choice: smallest upload within the tolerance of float32 MaTU
    assert choose_setting(summary, tolerance=0.06) == "cheap" and choose_setting(summary, tolerance=0.04) == "float32"
    text = format_study(summary, "cmd")
    assert "| matu | cheap |" in text and "1/40" in text and "Written by `cmd`" in text


def test_slug_names_every_coding_field():
    assert slug({}) == ""
    assert slug({"upload_bits": 1, "upload_topk": 0.1, "download_bits": 8}) == "up1top0.1-down8"
    assert slug({"download_bits": 4, "download_topk": 0.5}) == "down4top0.5"
