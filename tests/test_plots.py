"""Figures of absolute accuracy carry the tasks' chance level, so a bar near it reads as what it is."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from matu_lib import plots  # noqa: E402
from matu_lib.data import get_task  # noqa: E402


def test_mean_chance_is_the_mean_of_one_over_classes():
    tasks = ["mnist", "textures", "stripe_orientation"]
    expected = sum(1 / len(get_task(t).classes) for t in tasks) / 3
    assert plots.mean_chance(tasks) == pytest.approx(expected)
    assert plots.mean_chance(["mnist"]) == pytest.approx(0.1)  # ten digits


def _chance_lines(ax):
    return [line for line in ax.get_lines() if str(line.get_label()).startswith("chance (mean of 1/classes")]


def test_accuracy_figures_draw_the_chance_line_where_given():
    hist = {"matu": [{"round": 1, "mean_acc": 0.3, "cum_bytes_up": 10}, {"round": 2, "mean_acc": 0.4, "cum_bytes_up": 20}],
            "local": [{"round": 1, "mean_acc": 0.35, "cum_bytes_up": 0}]}
    iterative = {"matu": True, "local": False}
    for fig in (plots.accuracy_curves(hist, iterative, chance=0.125), plots.accuracy_vs_bytes(hist, iterative, chance=0.125)):
        (line,) = _chance_lines(fig.axes[0])
        assert list(line.get_ydata()) == [0.125, 0.125]
        plt.close(fig)
    fig = plots.accuracy_curves(hist, iterative)
    assert _chance_lines(fig.axes[0]) == []
    plt.close(fig)
    rows = [{"method": "matu", "mean_acc": 0.4, "mean_normalised": 0.7}, {"method": "local", "mean_acc": 0.35, "mean_normalised": 0.5}]
    fig = plots.final_bars(rows, chance=0.125)
    (line,) = _chance_lines(fig.axes[0])
    assert list(line.get_xdata()) == [0.125, 0.125] and _chance_lines(fig.axes[1]) == []
    plt.close(fig)


def test_retention_curve_adds_the_accuracy_panel_only_where_measured():
    cos_only = [{"model": "matu-micro", "pretrained": "random init", "params": 1e5, "retention": 0.8},
                {"model": "matu-tiny", "pretrained": "synthetic", "params": 2e5, "retention": 0.79}]
    assert len(plots.retention_curve(cos_only).axes) == 1
    both = [r | {"acc_retention": v} for r, v in zip(cos_only, (0.5, 0.7))]
    fig = plots.retention_curve(both)
    assert len(fig.axes) == 2
    (line,) = [ln for ln in fig.axes[1].get_lines() if ln.get_label() == "pretrained"]
    assert list(line.get_ydata()) == [0.7]
    plt.close("all")


def test_federated_round_draws_the_clients_it_names_and_says_how_many_there_are():
    fig = plots.federated_round(12, (4, 4))
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert sum(t.startswith("client ") for t in texts) == 4 and any("12" in t and "clients" in t for t in texts)
    assert any("FedAvg" in t for t in texts) and all("4 tasks" in t for t in texts if t.startswith("client "))
    plt.close(fig)
    fig = plots.federated_round(2, (1, 2))
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert sum(t.startswith("client ") for t in texts) == 2 and not any("in all" in t for t in texts)
    plt.close(fig)


def test_accuracy_in_context_draws_chance_and_zero_shot_per_task():
    fig = plots.accuracy_in_context({"a": 0.5, "b": 0.3}, {"a": 0.2, "b": 0.35}, {"a": 0.1, "b": 0.25})
    ax = fig.axes[0]
    segments = {c.get_label(): c.get_segments() for c in ax.collections}
    assert [s[0][1] for s in segments["zero-shot"]] == [0.2, 0.35]
    assert [s[0][1] for s in segments["chance (1 / classes)"]] == [0.1, 0.25]
    assert [p.get_height() for p in ax.patches] == [0.5, 0.3] and ax.get_ylim()[0] == 0
    plt.close(fig)
