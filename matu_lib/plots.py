"""Figures for the workbook. Every function returns a matplotlib Figure and never calls ``plt.show()``.

Conventions: readable labels (no overlapping text), perceptually sensible colour maps (diverging
``vlag`` centred at 0 for similarities, sequential ``rocket_r``/``mako`` for magnitudes), heatmaps
ordered by task family.
"""

from __future__ import annotations

import matplotlib

matplotlib.use(matplotlib.get_backend())  # keep the notebook's backend; Agg when headless (MPLBACKEND)

import matplotlib.pyplot as plt  # noqa: E402

# ----------------------------------------------------------------------------- geometry & similarity


def _family_ticks(ax, tasks, families, axis="both") -> None:
    """Lines between family blocks of an ordered heatmap (tasks must already be grouped by family)."""
    fams = [families[t] for t in tasks]
    for i in range(1, len(fams)):
        if fams[i] != fams[i - 1]:
            if axis in ("both", "x"):
                ax.axvline(i, color="black", lw=1.5)
            if axis in ("both", "y"):
                ax.axhline(i, color="black", lw=1.5)


def similarity_heatmap(
    matrix,
    tasks,
    families,
    title="",
    vmin=-1.0,
    vmax=1.0,
    cmap="vlag",
    center=0.0,
    annotate=None,
    label="similarity",
    ax=None,
    mask=None,
):
    """Heatmap of a [T, T] task matrix with family separators; tasks must be ordered by family.

    Diverging ``vlag`` centred at 0 for signed similarities; pass ``cmap="rocket_r", center=None`` for [0, 1]
    quantities such as mask overlap. Task labels carry their family in brackets.
    """
    import seaborn as sns

    n = len(tasks)
    if ax is None:
        side = max(4.0, 0.55 * n + 2.5)
        fig, ax = plt.subplots(figsize=(side + 1.0, side))
    else:
        fig = ax.figure
    annotate = n <= 8 if annotate is None else annotate
    labels = [f"{t} [{families[t]}]" for t in tasks]
    sns.heatmap(
        matrix,
        ax=ax,
        cmap=cmap,
        vmin=vmin,
        vmax=vmax,
        center=center,
        square=True,
        annot=annotate,
        mask=mask,
        fmt=".2f",
        annot_kws={"fontsize": 8},
        xticklabels=tasks,
        yticklabels=labels,
        cbar_kws={"label": label, "shrink": 0.8},
    )
    ax.set_xticklabels(ax.get_xticklabels(), rotation=45, ha="right", fontsize=9)
    ax.set_yticklabels(ax.get_yticklabels(), rotation=0, fontsize=9)
    _family_ticks(ax, tasks, families)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def heatmap_pair(matrices, titles, tasks, families, suptitle="", **kwargs):
    """Two family-ordered heatmaps side by side (e.g. cosine vs sign, or round 1 vs last round)."""
    n = len(tasks)
    side = max(4.0, 0.5 * n + 2.5)
    fig, axes = plt.subplots(1, 2, figsize=(2 * side + 2.5, side))
    for ax, m, title in zip(axes, matrices, titles):
        similarity_heatmap(m, tasks, families, title=title, ax=ax, **kwargs)
    axes[1].set_yticklabels([])
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig


def family_separation(matrix, tasks, families, label="cosine", title=""):
    """Per task, its mean similarity to the other tasks of its family (filled) and to tasks of other families
    (open), joined by a line: a task whose filled dot sits right of its open one is placed with its family.

    A per-task view of what a heatmap shows per pair; tasks alone in their family have no filled dot.
    """
    import numpy as np

    m = np.asarray(matrix, dtype=float)
    fams = list(dict.fromkeys(families[t] for t in tasks))
    palette = dict(zip(fams, _METHOD_PALETTE))
    fig, ax = plt.subplots(figsize=(6.5, 0.32 * len(tasks) + 1.4))
    for y, t in enumerate(tasks):
        same = [j for j, u in enumerate(tasks) if u != t and families[u] == families[t]]
        other = [j for j, u in enumerate(tasks) if families[u] != families[t]]
        across = float(m[y, other].mean()) if other else float("nan")
        within = float(m[y, same].mean()) if same else float("nan")
        colour = palette[families[t]]
        if same and other:
            ax.plot([across, within], [y, y], color=colour, lw=1.2, alpha=0.7)
        if same:
            ax.plot(within, y, "o", color=colour, ms=7)
        if other:
            ax.plot(across, y, "o", mfc="white", mec=colour, ms=7)
    ax.set_yticks(range(len(tasks)), [f"{t} [{families[t]}]" for t in tasks], fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0, color="black", lw=0.8, ls=":")
    handles = [
        plt.Line2D([], [], marker="o", ls="", color="black", label="mean to its family"),
        plt.Line2D([], [], marker="o", ls="", mfc="white", mec="black", label="mean to other families"),
    ]
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.set(xlabel=f"mean {label} similarity", title=title or f"Does {label} place each task with its family?")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def task_bars(values, families, ylabel, title="", reference=None, reference_label=None):
    """One bar per task coloured by family (e.g. task-vector norms, mask densities, rescalers)."""
    import seaborn as sns

    tasks = list(values)
    fams = list(dict.fromkeys(families[t] for t in tasks))
    palette = dict(zip(fams, sns.color_palette("tab10", len(fams))))
    fig, ax = plt.subplots(figsize=(max(5.0, 0.55 * len(tasks) + 2), 3.8))
    ax.bar(range(len(tasks)), [values[t] for t in tasks], color=[palette[families[t]] for t in tasks])
    if reference is not None:
        ax.axhline(reference, color="black", ls="--", lw=1, label=reference_label)
    ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right", fontsize=9)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    handles = [plt.Rectangle((0, 0), 1, 1, color=palette[f]) for f in fams]
    ax.legend(
        handles + ax.get_legend_handles_labels()[0],
        fams + ax.get_legend_handles_labels()[1],
        fontsize=8,
        loc="upper left",
        bbox_to_anchor=(1.01, 1),
    )
    fig.tight_layout()
    return fig


def sign_conflict_plot(conflicts, title="Sign conflicts per parameter group"):
    """Fraction of weights that two tasks push in opposite directions, per group; 0.5 = unrelated signs."""
    groups = list(conflicts)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.45 * len(groups) + 2), 3.8))
    ax.bar(range(len(groups)), [conflicts[g] for g in groups], color="#4c72b0")
    ax.axhline(0.5, color="black", ls="--", lw=1, label="chance: independent signs (0.5)")
    ax.set_xticks(range(len(groups)), groups, rotation=45, ha="right", fontsize=9)
    ax.set_ylabel("mean pairwise sign conflict")
    ax.set_ylim(0, 0.6)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def chance_jaccard(p: float, q: float) -> float:
    """Expected Jaccard overlap of two independent random masks with densities ``p`` and ``q``.

    Each coordinate is in both masks with probability pq and in either with p + q - pq, so for large masks
    the overlap concentrates at pq / (p + q - pq): 0.43 for two masks of density 0.6. Overlap at this level
    says nothing about shared structure; only the excess over it does. (Equivalently, the fraction of one
    mask's coordinates that the other keeps is just the other's density.)
    """
    union = p + q - p * q
    return p * q / union if union > 0 else 1.0


def mask_overlap_vs_chance(overlap, densities, tasks, families, title="Mask overlap against chance"):
    """Each task pair's measured Jaccard overlap against what independent masks of the same densities give.

    The diagonal is the chance line: points above it overlap more than chance. Pairs within a family are
    drawn apart from pairs across families, so one sees whether related tasks keep more of the same
    coordinates than unrelated ones beyond what their densities alone imply.
    """
    import numpy as np

    overlap = np.asarray(overlap, dtype=float)
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for same, colour, label in ((True, "#c0392b", "same family"), (False, "#4c72b0", "different families")):
        pts = [
            (chance_jaccard(densities[a], densities[b]), overlap[i, j])
            for i, a in enumerate(tasks)
            for j, b in enumerate(tasks)
            if i < j and (families[a] == families[b]) == same
        ]
        if pts:
            ax.scatter(*zip(*pts), color=colour, s=30, alpha=0.8, label=f"{label} ({len(pts)} pairs)")
    lo = min(0.0, float(overlap.min()))
    ax.plot([lo, 1], [lo, 1], color="black", ls="--", lw=1, label="chance (independent masks)")
    ax.set(
        xlabel="chance overlap pq / (p + q - pq)",
        ylabel="measured overlap (Jaccard)",
        title=title,
        xlim=(lo, 1),
        ylim=(lo, 1),
    )
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return fig


def overlap_heatmap(overlap, tasks, families, title="Mask overlap (Jaccard)"):
    """A [T, T] overlap matrix whose colours span its off-diagonal range, stated in the title.

    Overlaps between masks of similar density differ by a few hundredths; on a 0-1 scale they would all look
    alike. The diagonal (1 by definition) is left blank so it does not stretch the scale.
    """
    import numpy as np

    overlap = np.asarray(overlap, dtype=float)
    diagonal = np.eye(len(tasks), dtype=bool)
    lo, hi = float(overlap[~diagonal].min()), float(overlap[~diagonal].max())
    hi = hi if hi > lo else lo + 1e-3
    return similarity_heatmap(
        overlap,
        tasks,
        families,
        f"{title}: colours span {lo:.3f} to {hi:.3f}",
        vmin=lo,
        vmax=hi,
        cmap="rocket_r",
        center=None,
        label="Jaccard",
        mask=diagonal,
    )


def place_labels(ax, points, labels, colours=None, fontsize=8):
    """Annotate each (x, y) point with its label at the first nearby offset where the text stays inside the axes
    and overlaps no label placed before and no point; far offsets get a thin leader line. Returns the annotations.

    Points are handled in order; when every candidate overlaps something, the one overlapping least is kept
    (another label or the axes' edge counts ten times a point).
    Call after the figure's layout is final (positions are measured on the drawn canvas).
    """
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    near = [(6, 3), (6, -9), (-6, 3), (-6, -9), (0, 8), (0, -14), (10, -3), (-10, -3)]
    offsets = [(k * dx, k * dy) for k in (1, 2, 3, 4, 5, 6) for dx, dy in near]
    markers = []
    for x, y in points:  # each point's marker, about 8 px across
        px, py = ax.transData.transform((x, y))
        markers.append(matplotlib.transforms.Bbox([[px - 4, py - 4], [px + 4, py + 4]]))
    occupied = []  # the labels placed so far
    colours = colours or ["black"] * len(labels)
    placed = []
    for (x, y), label, colour in zip(points, labels, colours):
        best = None
        for k, (dx, dy) in enumerate(offsets):
            leader = {"arrowprops": {"arrowstyle": "-", "lw": 0.5, "color": "grey"}} if k >= len(near) else {}
            text = ax.annotate(
                label,
                (x, y),
                xytext=(dx, dy),
                textcoords="offset points",
                fontsize=fontsize,
                color=colour,
                ha="left" if dx > 0 else "right" if dx < 0 else "center",
                **leader,
            )
            text.update_positions(renderer)
            box = matplotlib.text.Text.get_window_extent(text, renderer)  # the text alone, not its leader line
            inside = ax.bbox.x0 <= box.x0 and box.x1 <= ax.bbox.x1 and ax.bbox.y0 <= box.y0 and box.y1 <= ax.bbox.y1
            # a label over another label or outside the axes is worse than one over a point
            clashes = 10 * (sum(box.overlaps(b) for b in occupied) + (not inside)) + sum(
                box.overlaps(b) for b in markers
            )
            if best is None or clashes < best[0]:
                if best is not None:
                    best[1].remove()
                best = (clashes, text, box)
            else:
                text.remove()
            if clashes == 0:
                break
        occupied.append(best[2])
        placed.append(best[1])
    return placed


def embedding_scatter(coords, tasks, families, title=""):
    """2-D map of task vectors, one colour per family, every point labelled."""
    import seaborn as sns

    fams = list(dict.fromkeys(families[t] for t in tasks))
    palette = dict(zip(fams, sns.color_palette("tab10", len(fams))))
    fig, ax = plt.subplots(figsize=(6.5, 5))
    for f in fams:
        idx = [i for i, t in enumerate(tasks) if families[t] == f]
        ax.scatter(coords[idx, 0], coords[idx, 1], color=palette[f], s=60, label=f)
    ax.margins(0.2)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    place_labels(ax, [tuple(coords[i]) for i in range(len(tasks))], list(tasks))
    return fig


def alpha_curves(alphas, curves, title="", xlabel="alpha", references=None):
    """Accuracy vs scaling coefficient, one line per task; ``references`` adds dashed levels (label -> acc)."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, ys) in enumerate(curves.items()):
        ax.plot(alphas, ys, marker="o", color=colours[i % len(colours)], label=label)
    for i, (label, y) in enumerate((references or {}).items()):
        ax.axhline(y, ls="--", lw=1, color=colours[i % len(colours)], label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    return fig


def grouped_task_bars(table, ylabel="test accuracy", title="", ylim=(0, 1.02)):
    """Grouped bars: ``table[series][task]``, one group per task (e.g. modulator variants, or methods)."""
    import numpy as np

    series = list(table)
    tasks = list(table[series[0]])
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(tasks) + 3), 4))
    x = np.arange(len(tasks))
    for i, s in enumerate(series):
        ax.bar(x + (i - (len(series) - 1) / 2) * width, [table[s][t] for t in tasks], width, label=s)
    ax.set_xticks(x, tasks, rotation=45, ha="right", fontsize=9)
    ax.set_ylabel(ylabel)
    ax.set_ylim(*ylim)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    return fig


def line_per_round(values, ylabel, title="", reference=None):
    """A quantity per federated round; ``values`` is one list, or a mapping / DataFrame of named lists (a line each)."""
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    series = {k: list(v) for k, v in values.items()} if hasattr(values, "items") else {None: list(values)}
    rounds = list(range(1, max(len(v) for v in series.values()) + 1))
    for name, ys in series.items():
        ax.plot(rounds[: len(ys)], ys, marker="o", label=name)
    if len(series) > 1 or None not in series:
        ax.legend(frameon=False)
    if reference is not None:
        ax.axhline(reference, color="black", ls="--", lw=1)
    ax.set_xticks(rounds)
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def task_image_grid(data, classes, per_task=6, title=""):
    """The first ``per_task`` images of each task with their class names.

    ``data[task] = (uint8 images [N, 3, H, W], labels [N])`` (a split, e.g. ``ctx.test``); ``classes[task]``
    are the class names the zero-shot head reads.
    """
    tasks = list(data)
    fig, axes = plt.subplots(len(tasks), per_task, figsize=(1.3 * per_task + 1.8, 1.35 * len(tasks)), squeeze=False)
    for r, t in enumerate(tasks):
        images, labels = data[t]
        for c in range(per_task):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(images):
                ax.imshow(images[c].permute(1, 2, 0).numpy())
                ax.set_title(str(classes[t][int(labels[c])])[:12], fontsize=7, pad=2)
        axes[r, 0].set_ylabel(t, rotation=0, ha="right", va="center", fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def federated_round(n_clients: int, tasks_per_client: tuple[int, int] = (1, 1), shown: int = 4):
    """One federated round drawn as a schematic: the server sends the model down, each client trains on its own
    data, sends its update up, and the server averages the updates into the next model (FedAvg).

    At most ``shown`` clients are drawn (the rest as an ellipsis); ``tasks_per_client`` labels what each holds.
    """
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    fig, ax = plt.subplots(figsize=(8, 3.6))
    ax.set(xlim=(0, 10), ylim=(0, 6))
    ax.axis("off")

    def box(x, y, w, h, text, colour):
        ax.add_patch(
            FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.08", fc=colour, ec="black", lw=1)
        )
        ax.text(x, y, text, ha="center", va="center", fontsize=9)

    box(5, 5.1, 9.0, 1.0, "server: average the updates (FedAvg)\n-> the model of the next round", "#dbe9f6")
    drawn = min(n_clients, shown)
    right = 7.6 if n_clients > drawn else 8.8  # room for "... n clients" on the right
    xs = [1.2 + i * ((right - 1.2) / (drawn - 1)) for i in range(drawn)] if drawn > 1 else [5.0]
    lo, hi = tasks_per_client
    held = f"{lo} task{'s' * (lo != 1)}" if lo == hi else f"{lo}-{hi} tasks"
    for i, x in enumerate(xs):
        box(x, 1.0, 1.7, 1.0, f"client {i}\n{held}, own data", "#fdebd0")
        ax.add_patch(
            FancyArrowPatch(
                (x - 0.25, 4.5), (x - 0.25, 1.6), arrowstyle="-|>", mutation_scale=12, color="#4c72b0", lw=1.3
            )
        )
        ax.add_patch(
            FancyArrowPatch(
                (x + 0.25, 1.6), (x + 0.25, 4.5), arrowstyle="-|>", mutation_scale=12, color="#c0392b", lw=1.3
            )
        )
    ax.text(xs[0] - 0.35, 3.05, "model\n(down)", ha="right", va="center", fontsize=8, color="#4c72b0")
    ax.text(xs[0] + 0.35, 3.05, "update\n(up)", ha="left", va="center", fontsize=8, color="#c0392b")
    if n_clients > drawn:
        ax.text(9.9, 1.0, f"... {n_clients}\nclients\nin all", ha="right", va="center", fontsize=9)
    ax.set_title(
        "One round: download, train locally on private data, upload, average; repeated for `rounds`", fontsize=10
    )
    fig.tight_layout()
    return fig


def accuracy_in_context(accuracy: dict, zero_shot: dict, chance: dict, label: str = "MaTU (final)"):
    """Per task: the run's accuracy as a bar, with the task's chance level (1 / classes) and its zero-shot
    accuracy as ticks, so an absolute number reads against where it started and where guessing lies."""
    tasks = list(accuracy)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(tasks) + 2.5), 3.8))
    xs = range(len(tasks))
    ax.bar(xs, [accuracy[t] for t in tasks], color="#c0392b", alpha=0.85, label=label)
    ax.hlines(
        [zero_shot[t] for t in tasks],
        [x - 0.4 for x in xs],
        [x + 0.4 for x in xs],
        color="black",
        lw=2.5,
        label="zero-shot",
        zorder=3,
    )
    ax.hlines(
        [chance[t] for t in tasks],
        [x - 0.4 for x in xs],
        [x + 0.4 for x in xs],
        color="dimgrey",
        lw=1.5,
        ls="--",
        label="chance (1 / classes)",
        zorder=3,
    )
    ax.set_xticks(list(xs), tasks, rotation=45, ha="right", fontsize=9)
    ax.set(ylabel="test accuracy", ylim=(0, 1.02), title="Accuracy per task against chance and zero-shot")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- federated runs


_ONE_SHOT_STYLE = dict(linestyle="--", linewidth=1.2, alpha=0.9)
# Distinct strong colours, none red (red is MaTU's); tab10 first, then darker ones.
_METHOD_PALETTE = [
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
    "#393b79",
    "#637939",
    "#8c6d31",
    "#7b4173",
    "#1b9e77",
    "#e6ab02",
    "#000000",
]
# Line styles of the horizontal reference lines, so two lines of similar colour still differ.
REFERENCE_STYLES = ["--", ":", "-.", (0, (6, 2, 1, 2, 1, 2)), (0, (1, 3)), (0, (10, 3)), (0, (3, 1, 1, 1))]


def method_colours(methods) -> dict:
    """A fixed colour per method across figures; MaTU is always the strong red."""
    from .methods import METHODS

    order = [m for m in METHODS if m != "matu"]
    palette = _METHOD_PALETTE
    colours = {m: palette[i % len(palette)] for i, m in enumerate(order)}
    colours["matu"] = "#c0392b"
    return {m: colours.get(m, "grey") for m in methods}


def chance_line(ax, chance: float | None, vertical: bool = False) -> None:
    """The mean chance accuracy of the tasks (mean of 1 / classes) as a grey dash-dot line, when given."""
    if chance is None:
        return
    style = dict(color="grey", lw=1, ls="-.", label=f"chance (mean of 1/classes, {chance:.2f})")
    (ax.axvline if vertical else ax.axhline)(chance, **style)


def mean_chance(tasks) -> float:
    """Mean over ``tasks`` of 1 / (number of classes): where a mean absolute accuracy starts meaning anything."""
    from .data import get_task

    return sum(1 / len(get_task(t).classes) for t in tasks) / len(tasks)


def accuracy_curves(
    histories: dict, iterative: dict, title: str = "Mean test accuracy per round", chance: float | None = None
):
    """Iterative methods as lines over rounds; one-shot / no-communication methods as dashed horizontal lines;
    ``chance`` (``mean_chance(tasks)``) as a grey line."""
    colours = method_colours(histories)
    fig, ax = plt.subplots(figsize=(8, 4.5), constrained_layout=True)
    rounds = max(len(h) for h in histories.values())
    references = 0
    for m, hist in histories.items():
        pts = [(h["round"], h["mean_acc"]) for h in hist if "mean_acc" in h]
        if iterative.get(m, True):
            ax.plot(*zip(*pts), marker="o", color=colours[m], lw=2.5 if m == "matu" else 1.5, label=m)
        else:
            kind = "one-shot" if hist[-1]["cum_bytes_up"] else "no communication"
            ax.axhline(
                pts[-1][1],
                color=colours[m],
                label=f"{m} ({kind})",
                lw=1.6,
                ls=REFERENCE_STYLES[references % len(REFERENCE_STYLES)],
            )
            references += 1
    chance_line(ax, chance)
    ax.set(xlabel="round", ylabel="mean accuracy (absolute)", title=title, xticks=range(1, rounds + 1))
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    return fig


def final_bars(rows: list[dict], chance: float | None = None):
    """Two panels: absolute mean accuracy (with the tasks' mean ``chance`` line when given) and mean normalised
    accuracy (0 = chance, 1.0 = individual fine-tuning)."""
    import numpy as np

    order = sorted(rows, key=lambda r: r["mean_acc"])
    names = [r["method"] for r in order]
    colours = [method_colours(names)[m] for m in names]
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.35 * len(rows) + 1.5), sharey=True, constrained_layout=True)
    for ax, key, label in (
        (axes[0], "mean_acc", "mean accuracy (absolute)"),
        (axes[1], "mean_normalised", "mean normalised accuracy (chance 0, individual 1)"),
    ):
        values = [r.get(key, np.nan) for r in order]
        ax.barh(names, values, color=colours)
        for y, v in enumerate(values):
            ax.text(v, y, f" {v:.2f}", va="center", fontsize=8)
        ax.set(xlabel=label, xlim=(0, max(np.nanmax(values) * 1.18, 0.05)))
        ax.grid(axis="x", alpha=0.3)
    axes[1].axvline(1.0, color="black", lw=0.8, ls=":")
    chance_line(axes[0], chance, vertical=True)
    if chance is not None:
        axes[0].legend(loc="lower right", fontsize=8, frameon=False)
    return fig


def paired_differences(summary: dict, exclude: tuple[str, ...] = ()):
    """MaTU - method per baseline with its bootstrap interval (bar) and per-seed differences (dots), per measure.

    ``summary`` is ``stats.aggregate_seeds``'s result. Left of the dotted zero line MaTU loses; an interval
    that crosses zero means the seeds and tasks measured do not settle the order.
    """
    diffs = {m: d for m, d in summary["differences"].items() if m not in exclude}
    if not diffs:
        raise ValueError("the summary has no paired differences (was the target method among the methods?)")
    names = sorted(diffs, key=lambda m: diffs[m]["acc"]["mean"])
    target = "MaTU" if summary["target"] == "matu" else summary["target"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.4 * len(names) + 1.6), sharey=True, constrained_layout=True)
    for ax, key, label in ((axes[0], "acc", "absolute accuracy"), (axes[1], "normalised", "normalised accuracy")):
        for y, m in enumerate(names):
            d = diffs[m][key]
            lo, hi = d["ci"]
            colour = "#c0392b" if hi < 0 else ("#2e7d32" if lo > 0 else "#555555")
            ax.plot([lo, hi], [y, y], color=colour, lw=2.5, solid_capstyle="butt")
            ax.plot(d["mean"], y, "o", color=colour, markersize=6)
            ax.plot(d["per_seed"], [y] * len(d["per_seed"]), "|", color="black", markersize=9, alpha=0.6)
        ax.axvline(0.0, color="black", lw=0.8, ls=":")
        level = round(100 * next(iter(diffs.values()))[key]["level"])
        ax.set(xlabel=f"{target} - method, {label}", title=f"{label}: mean, {level}% interval, seeds (|)")
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(names)), names)
    fig.suptitle(f"Paired differences over {len(summary['seeds'])} seeds (right of 0: {target} better)", fontsize=10)
    return fig


_PART_COLOURS = {
    "vectors": "#4c72b0",
    "masks": "#dd8452",
    "sketches": "#c44e52",
    "rescalers": "#55a868",
    "metadata": "#8c8c8c",
}


def bytes_stacked(parts_up: dict, parts_down: dict | None = None):
    """Bytes per round by component (vectors / masks / sketches / rescalers / metadata), one bar per method."""
    panels = [("upload per round", parts_up)] + ([("download per round", parts_down)] if parts_down else [])
    names = list(parts_up)
    fig, axes = plt.subplots(
        1,
        len(panels),
        figsize=(5 * len(panels) + 1, 0.35 * len(names) + 1.5),
        sharey=True,
        constrained_layout=True,
        squeeze=False,
    )
    for ax, (title, parts) in zip(axes[0], panels):
        left = [0.0] * len(names)
        for comp, colour in _PART_COLOURS.items():
            widths = [parts[m].get(comp, 0) / 1e6 for m in names]
            ax.barh(names, widths, left=left, color=colour, label=comp)
            left = [a + b for a, b in zip(left, widths)]
        for y, total in enumerate(left):
            if total == 0:
                ax.text(0, y, " 0 B (no communication)", va="center", fontsize=8, color="dimgrey")
        ax.set(xlabel="MB", title=title)
        ax.grid(axis="x", alpha=0.3)
    axes[0][-1].legend(loc="lower right", fontsize=8)
    return fig


def accuracy_vs_bytes(histories: dict, iterative: dict, target: float | None = None, chance: float | None = None):
    """Mean accuracy against cumulative upload bytes (log x); methods that upload nothing as dashed lines;
    ``chance`` (``mean_chance(tasks)``) as a grey line."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    colours = method_colours(histories)
    fig, ax = plt.subplots(figsize=(8, 4.5), constrained_layout=True)
    for m, hist in histories.items():
        pts = [(h["cum_bytes_up"], h["mean_acc"]) for h in hist if "mean_acc" in h]
        if pts[-1][0] == 0:
            ax.axhline(pts[-1][1], color=colours[m], label=f"{m} (no upload)", **_ONE_SHOT_STYLE)
        else:
            style = dict(marker="o") if iterative.get(m, True) else dict(marker="D", markersize=8, linestyle="none")
            ax.plot(*zip(*pts), color=colours[m], lw=2.5 if m == "matu" else 1.5, label=m, **style)
    if target is not None:
        ax.axhline(target, color="black", lw=0.8, ls=":", label=f"target {target:.2f}")
    chance_line(ax, chance)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x / 1e6:g} MB"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set(xlabel="cumulative upload (log scale)", ylabel="mean accuracy (absolute)", title="Accuracy vs communication")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    return fig


def accuracy_vs_upload(rows: list[dict], title: str = "Accuracy against upload, per coding setting"):
    """Mean normalised accuracy against upload per client and round (log x), one colour per method, one point
    per coding setting (``communication_study`` rows), error bars = sd over seeds, each method's Pareto
    frontier drawn as a line."""
    import math

    from matplotlib.ticker import FuncFormatter

    methods = list(dict.fromkeys(r["method"] for r in rows))
    colours = method_colours(methods)
    fig, ax = plt.subplots(figsize=(8.5, 4.8), constrained_layout=True)
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        xs = [r["up_bytes_per_client_round"] for r in mine]
        ys = [r["mean_normalised"][0] for r in mine]
        err = [0 if math.isnan(r["mean_normalised"][1]) else r["mean_normalised"][1] for r in mine]
        ax.errorbar(xs, ys, yerr=err, fmt="o", color=colours[m], capsize=3, label=m, ms=7 if m == "matu" else 5)
        front = sorted((r["up_bytes_per_client_round"], r["mean_normalised"][0]) for r in mine if r["pareto"])
        ax.plot(*zip(*front), color=colours[m], lw=2.5 if m == "matu" else 1.5, alpha=0.8)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x / 1e3:g} kB"))
    ax.set(
        xlabel="upload per client and round (serialised bytes, log scale)",
        ylabel="mean normalised accuracy (chance-corrected)",
        title=title,
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower right", fontsize=8)
    ax.margins(x=0.15, y=0.12)
    place_labels(
        ax,
        [(r["up_bytes_per_client_round"], r["mean_normalised"][0]) for r in rows],
        [r["setting"] for r in rows],
        [colours[r["method"]] for r in rows],
        fontsize=7,
    )
    return fig


def ablation_bars(rows: list[dict], metric: str = "mean_acc", ncols: int = 3):
    """Small multiples, one panel per ablation axis; the MaTU default bar is red, skipped settings marked."""
    import math
    import textwrap

    axes_names = list(dict.fromkeys(r["axis"] for r in rows))
    nrows = math.ceil(len(axes_names) / ncols)
    ncols = min(ncols, len(axes_names))
    fig, axs = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 2.9 * nrows), squeeze=False, constrained_layout=True)
    finite = [r[metric] for r in rows if r[metric] == r[metric]]
    top = max(finite, default=1.0) * 1.25
    for ax, axis in zip(axs.flat, axes_names):
        sub = [r for r in rows if r["axis"] == axis]
        default = f"MaTU\n({sub[0]['value']})" if "," not in sub[0]["value"] else "MaTU\n(default)"
        labels = [default] + [textwrap.fill(r["setting"], 11) for r in sub[1:]]
        values = [0.0 if r[metric] != r[metric] else r[metric] for r in sub]
        ax.bar(range(len(sub)), values, color=["#c0392b"] + ["#7f8c8d"] * (len(sub) - 1))
        for i, (r, v) in enumerate(zip(sub, values)):
            ax.text(i, v, f"{v:.3f}" if r["status"] == "ok" else "skipped", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(sub)), labels, fontsize=8)
        ax.set(title=axis, ylim=(0, top), ylabel=metric.replace("_", " "))
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axs.flat)[len(axes_names) :]:
        ax.set_visible(False)
    return fig


def retention_curve(rows: list[dict]):
    """Unification retention against encoder parameters, log x: the mean cosine of reconstruction with original
    and, where ``rows`` measured it, the share of accuracy above chance the reconstruction keeps.

    ``rows`` from ``geometry.retention_by_size``; random-init and pretrained points drawn apart.
    """
    panels = [("retention", "retention (cosine, per-client unification)")]
    if any("acc_retention" in r for r in rows):
        panels.append(("acc_retention", "accuracy kept above chance"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.8), squeeze=False)
    labelled = {}
    for ax, (key, label) in zip(axes[0], panels):
        values = []
        for kind, marker, colour in RETENTION_KINDS:
            pts = sorted(
                (r["params"], r[key], r["model"])
                for r in rows
                if key in r and (r["pretrained"] == "random init") == (kind == "random init")
            )
            if pts:
                ax.plot(
                    [p[0] for p in pts],
                    [p[1] for p in pts],
                    marker=marker,
                    ms=10 if marker == "*" else 6,
                    color=colour,
                    ls="-" if len(pts) >= 3 else "none",
                    label=f"{kind} ({len(pts)} sizes)",
                )
                labelled.setdefault(ax, []).extend((x, y, f"{name} {y:.3f}", colour) for x, y, name in pts)
                values += [p[1] for p in pts]
        # the whole range from 0 to 1 (and any value outside it): a few thousandths must look like what they are
        lo, hi = min([0.0, *values]), max([1.0, *values])
        ax.set_ylim(lo - 0.02 * (hi - lo), hi + 0.08 * (hi - lo))
        ax.set_xscale("log")
        ax.margins(x=0.5)
        ax.set_xlabel("image-encoder parameters")
        ax.set_ylabel(label)
        ax.legend(frameon=False, fontsize=8, loc="lower right")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("What one unification keeps, by encoder size (y from 0: differences at true scale)")
    fig.tight_layout()
    for ax, pts in labelled.items():
        place_labels(ax, [(x, y) for x, y, _, _ in pts], [p[2] for p in pts], [p[3] for p in pts])
    return fig


# One marker and colour per kind of encoder, the same in every panel.
RETENTION_KINDS = (("random init", "o", "#4c72b0"), ("pretrained", "*", "#dd8452"))
