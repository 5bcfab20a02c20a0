"""An interactive explorer for task similarity (notebook 02), with a static fallback that never blocks.

    similarity_explorer(vectors, layout, families)          # figure always; controls when a live frontend exists

Pick tasks, the metric (cosine / sign agreement) and a parameter group (whole encoder, stem, one block's
attention or MLP, ...) and the family-ordered heatmap redraws. Headless execution (papermill, nbconvert,
tests) has no frontend to send widget events, so a static figure is always returned: per task, its mean
similarity to its own family against the other families (the whole-encoder heatmap is notebook 01's figure,
not repeated here); the controls are only added when ``interactive`` is True, or when it is None and we run
inside a Jupyter kernel with ipywidgets installed. Nothing here waits for input.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

from . import geometry, plots


def has_frontend() -> bool:
    """True inside a Jupyter (ZMQ) kernel with ipywidgets importable; False in scripts and plain IPython."""
    try:
        import ipywidgets  # noqa: F401
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def explorer_figure(
    vectors: Mapping[str, Tensor],
    layout,
    families: Mapping[str, str],
    tasks: Sequence[str] | None = None,
    metric: str = "cosine",
    group: str | None = None,
):
    """The explorer's figure for one selection: a family-ordered heatmap of the chosen tasks."""
    tasks = geometry.family_order(list(tasks or vectors), families)
    chosen = {t: vectors[t] for t in tasks}
    matrix = geometry.group_similarity(chosen, layout, group, metric)
    where = "whole encoder" if group is None else group
    return plots.similarity_heatmap(matrix, tasks, families, title=f"{metric} similarity, {where}", label=metric)


def separation_figure(vectors: Mapping[str, Tensor], families: Mapping[str, str], metric: str = "cosine"):
    """Per task, its mean similarity (whole encoder) to its own family and to the others."""
    tasks = geometry.family_order(list(vectors), families)
    matrix = geometry.pairwise_similarity({t: vectors[t] for t in tasks}, metric)
    return plots.family_separation(matrix, tasks, families, label=metric)


def similarity_explorer(
    vectors: Mapping[str, Tensor], layout, families: Mapping[str, str], interactive: bool | None = None
):
    """The static per-task family separation (always) and, with a live frontend, controls that draw heatmaps.

    Returns the static figure so a notebook can save it. ``interactive=False`` forces the static path.
    """
    import matplotlib.pyplot as plt
    from IPython.display import display

    fig = separation_figure(vectors, families)
    if interactive is None:
        interactive = has_frontend()
    if not interactive:
        return fig
    import ipywidgets as w

    groups = [("whole encoder", None)] + [(g, g) for g in geometry.group_slices(layout)]
    tasks = w.SelectMultiple(
        options=list(vectors), value=tuple(vectors), description="tasks", rows=min(12, len(vectors))
    )
    metric = w.ToggleButtons(options=["cosine", "sign"], description="metric")
    group = w.Dropdown(options=groups, value=None, description="layer")
    out = w.Output()

    def redraw(_=None) -> None:
        with out:
            out.clear_output(wait=True)
            if len(tasks.value) >= 2:
                f = explorer_figure(vectors, layout, families, tasks.value, metric.value, group.value)
                display(f)
                plt.close(f)
            else:
                print("select at least two tasks")

    for control in (tasks, metric, group):
        control.observe(redraw, names="value")
    display(w.HBox([tasks, w.VBox([metric, group])]), out)
    redraw()
    return fig
