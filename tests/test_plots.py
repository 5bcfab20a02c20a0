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
    hist = {
        "matu": [{"round": 1, "mean_acc": 0.3, "cum_bytes_up": 10}, {"round": 2, "mean_acc": 0.4, "cum_bytes_up": 20}],
        "local": [{"round": 1, "mean_acc": 0.35, "cum_bytes_up": 0}],
    }
    iterative = {"matu": True, "local": False}
    for fig in (
        plots.accuracy_curves(hist, iterative, chance=0.125),
        plots.accuracy_vs_bytes(hist, iterative, chance=0.125),
    ):
        (line,) = _chance_lines(fig.axes[0])
        assert list(line.get_ydata()) == [0.125, 0.125]
        plt.close(fig)
    fig = plots.accuracy_curves(hist, iterative)
    assert _chance_lines(fig.axes[0]) == []
    plt.close(fig)
    rows = [
        {"method": "matu", "mean_acc": 0.4, "mean_normalised": 0.7},
        {"method": "local", "mean_acc": 0.35, "mean_normalised": 0.5},
    ]
    fig = plots.final_bars(rows, chance=0.125)
    (line,) = _chance_lines(fig.axes[0])
    assert list(line.get_xdata()) == [0.125, 0.125] and _chance_lines(fig.axes[1]) == []
    plt.close(fig)


def test_retention_curve_adds_the_accuracy_panel_only_where_measured():
    cos_only = [
        {"model": "matu-micro", "pretrained": "random init", "params": 1e5, "retention": 0.8},
        {"model": "matu-tiny", "pretrained": "synthetic", "params": 2e5, "retention": 0.79},
    ]
    assert len(plots.retention_curve(cos_only).axes) == 1
    both = [r | {"acc_retention": v} for r, v in zip(cos_only, (0.5, 0.7))]
    fig = plots.retention_curve(both)
    assert len(fig.axes) == 2
    (line,) = [ln for ln in fig.axes[1].get_lines() if str(ln.get_label()).startswith("pretrained")]
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


_SIZES = [
    {"model": "matu-micro", "pretrained": "random init", "params": 5e4, "retention": 0.801},
    {"model": "matu-tiny", "pretrained": "random init", "params": 2e5, "retention": 0.798},
    {"model": "matu-tiny", "pretrained": "synthetic", "params": 2e5, "retention": 0.790, "acc_retention": 0.61},
    {"model": "matu-small", "pretrained": "synthetic", "params": 8e5, "retention": 0.793, "acc_retention": 0.64},
]


def test_retention_curve_shows_differences_at_true_scale_with_one_colour_per_kind():
    fig = plots.retention_curve(_SIZES)
    colours = {}
    for ax in fig.axes:
        lo, hi = ax.get_ylim()
        assert lo <= 0 and hi >= 1  # no truncated axis that blows a 0.003 difference up to the full height
        for line in ax.get_lines():
            kind = str(line.get_label()).split(" (")[0]
            colours.setdefault(kind, set()).add(line.get_color())
            assert line.get_linestyle() == "None"  # two sizes: points, not a trend line
    assert colours == {"random init": {"#4c72b0"}, "pretrained": {"#dd8452"}}  # the same in both panels
    plt.close(fig)
    three = _SIZES + [{"model": "matu-big", "pretrained": "random init", "params": 9e5, "retention": 0.9}]
    fig = plots.retention_curve(three)
    (line,) = [ln for ln in fig.axes[0].get_lines() if str(ln.get_label()).startswith("random init")]
    assert line.get_linestyle() == "-"
    plt.close(fig)
    wide = [r | {"acc_retention": v} for r, v in zip(_SIZES[2:], (-0.2, 1.3))]
    fig = plots.retention_curve(wide)
    lo, hi = fig.axes[1].get_ylim()
    assert lo < -0.2 and hi > 1.3  # values outside [0, 1] stay on the axis
    plt.close(fig)


def test_overlap_heatmap_fits_its_colours_to_the_off_diagonal_range_and_says_so():
    import numpy as np

    J = np.array([[1.0, 0.42, 0.44], [0.42, 1.0, 0.41], [0.44, 0.41, 1.0]])
    tasks = ["a", "b", "c"]
    fig = plots.overlap_heatmap(J, tasks, {"a": "x", "b": "x", "c": "y"})
    ax = fig.axes[0]
    (mesh,) = ax.collections
    assert mesh.get_clim() == pytest.approx((0.41, 0.44)) and "0.410 to 0.440" in ax.get_title()
    assert np.ma.count_masked(mesh.get_array()) == 3  # the diagonal (1 by definition) is not drawn
    plt.close(fig)


def _overlapping_pairs(fig, ax):
    from matplotlib.text import Text

    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [Text.get_window_extent(t, renderer) for t in ax.texts]  # the words, without leader lines
    return [
        (ax.texts[i].get_text(), ax.texts[j].get_text())
        for i in range(len(boxes))
        for j in range(i)
        if boxes[i].overlaps(boxes[j])
    ]


def test_point_labels_do_not_overlap_even_for_clustered_points():
    import numpy as np

    rng = np.random.default_rng(0)
    coords = np.vstack([rng.normal(size=(6, 2)) * 0.01, rng.normal(size=(6, 2))])  # six points in one spot
    tasks = [f"task_{i}" for i in range(12)]
    fig = plots.embedding_scatter(coords, tasks, {t: str(i % 3) for i, t in enumerate(tasks)}, "PCA")
    ax = fig.axes[0]
    assert sorted(t.get_text() for t in ax.texts) == sorted(tasks)
    assert _overlapping_pairs(fig, ax) == []
    plt.close(fig)
    rows = [
        {
            "method": m,
            "setting": s,
            "up_bytes_per_client_round": 1e5 / 2**i * (1.02 if m == "matu" else 1),
            "mean_normalised": [0.7 - 0.002 * i, 0.01],
            "pareto": True,
        }
        for m in ("matu", "per_task_fedavg")
        for i, s in enumerate(["float32", "8-bit", "4-bit", "1-bit"])
    ]
    fig = plots.accuracy_vs_upload(rows)
    assert len(fig.axes[0].texts) == 8 and _overlapping_pairs(fig, fig.axes[0]) == []
    plt.close(fig)


def test_accuracy_curves_reference_lines_differ_in_style_and_colour():
    from matplotlib.colors import to_rgb

    one_shot = [
        "zero_shot",
        "local",
        "individual",
        "individual_converged",
        "task_arithmetic",
        "ties",
        "tall_masks",
        "consensus",
        "emr",
    ]
    hist = {m: [{"round": 1, "mean_acc": 0.3 + 0.01 * i, "cum_bytes_up": 0}] for i, m in enumerate(one_shot)}
    hist["matu"] = [{"round": 1, "mean_acc": 0.3, "cum_bytes_up": 1}, {"round": 2, "mean_acc": 0.4, "cum_bytes_up": 2}]
    fig = plots.accuracy_curves(hist, {m: m == "matu" for m in hist})
    lines = [ln for ln in fig.axes[0].get_lines() if str(ln.get_label()).split(" (")[0] in one_shot]
    assert len(lines) == len(one_shot)
    styles = [(ln.get_linestyle(), str(ln._unscaled_dash_pattern)) for ln in lines]  # named style and dash pattern
    assert all(styles[i] != styles[i + 1] for i in range(len(styles) - 1))  # neighbours in the legend differ
    colours = [to_rgb(ln.get_color()) for ln in lines]
    assert len(set(colours)) == len(colours)
    assert all(max(c) < 0.95 or min(c) < 0.5 for c in colours)  # no pale pastels
    plt.close(fig)


def test_family_separation_places_each_task_against_its_family_and_the_rest():
    import numpy as np

    tasks = ["a1", "a2", "b1", "solo"]
    fam = {"a1": "a", "a2": "a", "b1": "b", "solo": "z"}
    S = np.array([[1, 0.5, 0.1, 0.0], [0.5, 1, 0.2, 0.0], [0.1, 0.2, 1, 0.3], [0.0, 0.0, 0.3, 1]])
    fig = plots.family_separation(S, tasks, fam)
    filled = [
        ln
        for ln in fig.axes[0].get_lines()
        if ln.get_marker() == "o"
        and ln.get_markerfacecolor() != "white"
        and ln.get_label() not in ("mean to its family", "mean to other families")
    ]
    assert sorted((float(ln.get_xdata()[0]), float(ln.get_ydata()[0])) for ln in filled) == [(0.5, 0), (0.5, 1)]
    plt.close(fig)
