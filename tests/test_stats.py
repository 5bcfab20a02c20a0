"""Statistics over seeds: chance-corrected normalisation, flagging, bootstrap intervals, aggregation, sentences.

Every expected number below is worked out by hand in the comment beside it.
"""

import json
import math

import numpy as np
import pytest

from matu_lib.stats import (
    aggregate_seeds,
    bootstrap_mean_ci,
    chance_corrected,
    losses_in_words,
    mean_sd,
    normalise,
    paired_difference,
    unlearnable,
)


def test_mean_sd_uses_the_sample_sd():
    mean, sd = mean_sd([1.0, 2.0, 3.0, 4.0])
    assert mean == pytest.approx(2.5) and sd == pytest.approx(math.sqrt(5 / 3))  # squares 2.25+.25+.25+2.25 = 5, /3
    assert mean_sd([0.7])[0] == 0.7 and math.isnan(mean_sd([0.7])[1])


def test_chance_corrected_by_hand():
    assert chance_corrected(0.55, 0.9, 0.1) == pytest.approx(0.45 / 0.8)
    assert chance_corrected(0.1, 0.9, 0.1) == 0.0 and chance_corrected(0.9, 0.9, 0.1) == 1.0
    assert math.isnan(chance_corrected(0.3, 0.1, 0.1)) and math.isnan(chance_corrected(0.3, 0.098, 0.1))


def test_unlearnable_one_seed_margin_and_seed_spread():
    assert unlearnable([0.098], 0.1) and unlearnable([0.14], 0.1)  # gaps -0.002 and 0.04 < margin 0.05
    assert not unlearnable([0.2], 0.1)
    # mean 0.3, sd 0.1: gap 0.15 over chance 0.15 is three margins, but under 2 sd = 0.2 -> noise
    assert unlearnable([0.2, 0.3, 0.4], 0.15)
    # sd 0.01: 2 sd = 0.02, the margin 0.05 rules, gap 0.2 passes
    assert not unlearnable([0.29, 0.30, 0.31], 0.1)
    # sd tiny but the gap under the margin: still flagged (a 3-seed sd can be small by luck)
    assert unlearnable([0.13, 0.13, 0.131], 0.1)


def test_normalise_by_hand_with_a_flagged_task():
    acc = {"a": 0.5, "b": 0.8, "c": 0.2}
    ref = {"a": 0.9, "b": 0.9, "c": 0.12}
    chance = {"a": 0.1, "b": 0.5, "c": 0.1}  # b has two classes
    out = normalise(acc, ref, chance, flagged=["c"])
    # a: 0.4/0.8 = 0.5; b: 0.3/0.4 = 0.75; c: 0.1/0.02 = 5 (a reference near chance blows the score up)
    assert out["normalised"] == pytest.approx({"a": 0.5, "b": 0.75, "c": 5.0})
    assert out["mean_normalised"] == pytest.approx(0.625)
    assert out["mean_normalised_all"] == pytest.approx(6.25 / 3)
    assert out["ratio"] == pytest.approx({"a": 5 / 9, "b": 8 / 9, "c": 5 / 3})
    assert out["mean_ratio"] == pytest.approx(13 / 18) and out["mean_ratio_all"] == pytest.approx((13 / 9 + 5 / 3) / 3)
    assert out["flagged"] == ["c"]


def test_bootstrap_constant_and_two_value_examples():
    assert bootstrap_mean_ci(np.full((3, 4), 0.25), n_boot=500) == pytest.approx((0.25, 0.25))
    # one seed, tasks [0, 1]: resampled means 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4, so the 2.5% and
    # 97.5% quantiles are 0 and 1
    for scheme in ("crossed", "pairs"):
        assert bootstrap_mean_ci(np.array([[0.0, 1.0]]), n_boot=4000, scheme=scheme) == pytest.approx((0.0, 1.0))
    # seeds only: two seeds at 0 and 1 give the same three means
    d = np.array([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    assert bootstrap_mean_ci(d, n_boot=4000, scheme="seeds") == pytest.approx((0.0, 1.0))


def test_crossed_bootstrap_matches_a_naive_loop():
    rng = np.random.default_rng(5)
    d = rng.normal(size=(3, 5))
    lo, hi = bootstrap_mean_ci(d, n_boot=300, seed=11)
    draw = np.random.default_rng(11)
    s, t = draw.integers(0, 3, size=(300, 3)), draw.integers(0, 5, size=(300, 5))
    means = [np.mean([[d[i, j] for j in t[b]] for i in s[b]]) for b in range(300)]
    assert (lo, hi) == pytest.approx(tuple(np.quantile(means, [0.025, 0.975])))


def test_crossed_interval_counts_a_seed_effect_once():
    # every task moves with its seed: 36 cells but really 3 independent draws; treating cells as independent
    # ("pairs") understates the uncertainty
    rng = np.random.default_rng(0)
    d = np.array([0.1, -0.05, 0.02])[:, None] + 0.005 * rng.normal(size=(3, 12))
    lo_c, hi_c = bootstrap_mean_ci(d, scheme="crossed")
    lo_p, hi_p = bootstrap_mean_ci(d, scheme="pairs")
    assert hi_c - lo_c > 2 * (hi_p - lo_p)


def test_bootstrap_is_seeded_and_refuses_bad_input():
    d = np.random.default_rng(1).normal(size=(3, 6))
    assert bootstrap_mean_ci(d, seed=3) == bootstrap_mean_ci(d, seed=3)
    assert bootstrap_mean_ci(d, seed=3) != bootstrap_mean_ci(d, seed=4)
    with pytest.raises(ValueError, match="without NaN"):
        bootstrap_mean_ci(np.array([[0.1, math.nan]]))
    with pytest.raises(ValueError, match="scheme"):
        bootstrap_mean_ci(d, scheme="cells")


def test_paired_difference_mean_and_per_seed():
    a = np.array([[0.5, 0.7], [0.6, 0.6]])
    b = np.array([[0.4, 0.4], [0.7, 0.6]])
    out = paired_difference(a, b, n_boot=200)
    assert out["per_seed"] == pytest.approx([0.2, -0.05])  # (0.1+0.3)/2, (-0.1+0)/2
    assert out["mean"] == pytest.approx(0.075)
    assert out["ci"][0] <= out["mean"] <= out["ci"][1]


def _rows(acc: dict[str, dict[str, float]]) -> list[dict]:
    return [{"method": m, "acc": a, "bytes_up_per_round": 10.0, "server_state_bytes": 0} for m, a in acc.items()]


@pytest.fixture()
def two_seeds():
    chance = {"a": 0.1, "b": 0.5, "z": 0.1}  # z: a task nobody learns
    rows = {
        0: _rows(
            {
                "individual": {"a": 0.9, "b": 0.9, "z": 0.10},
                "matu": {"a": 0.5, "b": 0.8, "z": 0.20},
                "local": {"a": 0.7, "b": 0.6, "z": 0.10},
            }
        ),
        1: _rows(
            {
                "individual": {"a": 0.7, "b": 0.7, "z": 0.12},
                "matu": {"a": 0.4, "b": 0.7, "z": 0.15},
                "local": {"a": 0.6, "b": 0.6, "z": 0.10},
            }
        ),
    }
    return rows, chance


def test_aggregate_seeds_by_hand(two_seeds):
    rows, chance = two_seeds
    s = aggregate_seeds(rows, chance, n_boot=500)
    assert s["flagged"] == ["z"]  # individual 0.11 ± 0.014 on chance 0.1
    m = s["methods"]
    # matu normalised, seed 0: a 0.4/0.8 = 0.5, b 0.3/0.4 = 0.75 -> 0.625; seed 1: a 0.3/0.6 = 0.5, b 0.2/0.2 = 1
    # -> 0.75; mean 0.6875, sd |0.75 - 0.625| / sqrt(2)
    assert m["matu"]["mean_normalised"] == pytest.approx((0.6875, 0.125 / math.sqrt(2)))
    # absolute accuracy keeps every task: seed 0 (0.5+0.8+0.2)/3 = 0.5, seed 1 (0.4+0.7+0.15)/3 = 0.41667
    assert m["matu"]["mean_acc"][0] == pytest.approx((0.5 + 1.25 / 3) / 2)
    assert m["matu"]["acc"]["a"] == pytest.approx((0.45, 0.1 / math.sqrt(2)))
    assert m["individual"]["mean_normalised"] == pytest.approx((1.0, 0.0))
    # local normalised, seed 0: a 0.75, b 0.25 -> 0.5; seed 1: a 0.5/0.6, b 0.5 -> 2/3
    d = s["differences"]["local"]
    assert d["normalised"]["per_seed"] == pytest.approx([0.125, 0.75 - 2 / 3])
    # absolute, seed 0: (-0.2 + 0.2 + 0.1)/3; seed 1: (-0.2 + 0.1 + 0.05)/3
    assert d["acc"]["per_seed"] == pytest.approx([0.1 / 3, -0.05 / 3])
    assert d["acc"]["mean"] == pytest.approx(0.025 / 3)
    assert "matu" not in s["differences"] and set(s["differences"]) == {"individual", "local"}
    again = aggregate_seeds(rows, chance, n_boot=500)  # seeded: the same numbers every time (NaN-safe comparison)
    assert json.dumps(again, sort_keys=True) == json.dumps(s, sort_keys=True)


def test_aggregate_refuses_a_missing_method(two_seeds):
    rows, chance = two_seeds
    rows[1] = [r for r in rows[1] if r["method"] != "local"]
    with pytest.raises(ValueError, match=r"missing \(seed, method\): \[\(1, 'local'\)\]"):
        aggregate_seeds(rows, chance)


def test_losses_in_words_names_the_measure_and_the_interval(two_seeds):
    rows, chance = two_seeds
    for r in rows[0] + rows[1]:
        if r["method"] == "local":
            r["acc"] = {**r["acc"], "a": r["acc"]["a"] + 0.2}  # local now beats matu on both measures
    s = aggregate_seeds(rows, chance, n_boot=500)
    words = losses_in_words(s)
    assert len(words) == 1 and words[0].startswith("MaTU loses to local on absolute accuracy by ")
    d = s["differences"]["local"]
    assert (
        f"by {-d['acc']['mean']:.3f}" in words[0]
        and f"{d['acc']['ci'][0]:+.3f} to {d['acc']['ci'][1]:+.3f}" in words[0]
    )
    assert "and on normalised accuracy by" in words[0] and "2 seeds" in words[0]
    # individual beats matu too but is the reference, left out unless asked
    assert any(w.startswith("MaTU loses to individual") for w in losses_in_words(s, exclude=()))
    s["differences"] = {m: d for m, d in s["differences"].items() if m == "individual"}
    assert losses_in_words(s) == []


def test_paired_differences_plot_has_one_row_per_baseline(two_seeds):
    from matu_lib.plots import paired_differences

    rows, chance = two_seeds
    s = aggregate_seeds(rows, chance, n_boot=200)
    fig = paired_differences(s)
    left, right = fig.axes
    assert [t.get_text() for t in left.get_yticklabels()] == sorted(
        s["differences"], key=lambda m: s["differences"][m]["acc"]["mean"]
    )
    # per row: interval line, mean marker, per-seed ticks; plus the zero line
    assert len(left.lines) == 3 * len(s["differences"]) + 1
    d = s["differences"]["local"]["normalised"]
    assert any(list(line.get_xdata()) == d["ci"] for line in right.lines)
    with pytest.raises(ValueError, match="no paired differences"):
        paired_differences(s, exclude=tuple(s["differences"]))


def test_markdown_summary_states_flags_losses_and_per_task_rows(two_seeds):
    from matu_lib.comparison import format_seed_summary

    rows, chance = two_seeds
    s = aggregate_seeds(rows, chance, n_boot=200)
    s["sentences"], s["config"] = losses_in_words(s, exclude=()), {"preset": "toy", "eval_split": "test"}
    text = format_seed_summary(s, command="python -m matu_lib compare --preset toy")
    lines = text.splitlines()
    assert lines[0] == "# MaTU against the baselines: `toy` preset, seeds 0, 1"
    matu = next(line for line in lines if line.startswith("| **matu** |"))
    assert matu.split(" | ")[1:3] == [
        f"{s['methods']['matu']['mean_acc'][0]:.3f} ± {s['methods']['matu']['mean_acc'][1]:.3f}",
        "0.688 ± 0.088",
    ]
    d = s["differences"]["local"]["acc"]
    assert f"| {d['mean']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}] |" in text
    assert "left out of the normalised and ratio means: z (chance 0.100, individual 0.110 ± 0.014)" in text
    assert "| z (flagged) | 0.100 |" in text and text.count("| a | 0.100 |") == 2  # absolute and normalised tables
    assert len(s["sentences"]) == 1 and f"- {s['sentences'][0]}" in text  # matu loses to individual only


def test_one_seed_shows_no_spread_and_flags_by_the_margin_alone(two_seeds):
    from matu_lib.comparison import format_seed_summary

    rows, chance = two_seeds
    one = {0: rows[0]}
    # z: individual 0.10 on chance 0.1 is within the margin; a and b are far above it. With one seed no sd exists,
    # so the margin alone decides and every sd in the summary is NaN, never a number computed from one value
    s = aggregate_seeds(one, chance, n_boot=200)
    assert s["flagged"] == ["z"] and s["seeds"] == [0]
    for row in s["methods"].values():
        assert all(math.isnan(row[k][1]) for k in ("mean_acc", "mean_normalised", "mean_ratio"))
        assert all(math.isnan(sd) for _, sd in row["acc"].values())
    # individual 0.14 on chance 0.1: 0.04 above it, under the margin 0.05 -> flagged with one seed
    near = {0: [r | {"acc": r["acc"] | {"a": 0.14}} if r["method"] == "individual" else r for r in rows[0]]}
    assert aggregate_seeds(near, chance, n_boot=200)["flagged"] == ["a", "z"]

    s["sentences"], s["config"] = losses_in_words(s), {"preset": "toy", "eval_split": "test"}
    text = format_seed_summary(s)
    assert "Mean over 1 seed (no spread) (test split, 3 tasks)." in text
    assert "±" not in text and "sd over" not in text and "2 sd" not in text
    assert "Flagged as not learned (individual within 0.05 of chance; one seed gives no sd)" in text
    assert "## Per task: absolute accuracy (mean over 1 seed (no spread))" in text
    assert "with one seed: tasks resampled with replacement" in text
    matu = next(line for line in text.splitlines() if line.startswith("| **matu** |"))
    assert matu.split(" | ")[1:3] == ["0.500", "0.625"]  # seed 0 by hand: (0.5+0.8+0.2)/3; (0.5+0.75)/2

    # two seeds keep the sd and the rule that uses it
    two = format_seed_summary(aggregate_seeds(rows, chance, n_boot=200) | {"config": {"eval_split": "test"}})
    assert "Mean ± sd over 2 seeds (test split" in two and "within max(2 sd, 0.05) of chance" in two
