"""The two per-task fine-tuning references: ``individual`` (the federation's budget) and ``individual_converged``
(trained until validation accuracy stops improving), and the normalisation against the converged one."""

import itertools

import pytest
import torch

from matu_lib.federation import build_context, run
from matu_lib.methods import GRIDS, converged_task_vectors, individual_task_vectors
from matu_lib.presets import preset
from matu_lib.stats import aggregate_seeds


@pytest.fixture(scope="module")
def ctx():
    return build_context(preset("smoke", rounds=1, local_steps=2), log=lambda *_: None)


def test_converged_reference_stops_at_the_first_budget_that_does_not_improve_on_validation(ctx):
    vectors, choice = converged_task_vectors(ctx)
    same_budget = individual_task_vectors(ctx)
    for t in ctx.tasks:
        budget = ctx.cfg.rounds * ctx.cfg.local_steps * len(ctx.holders(t))
        tried = choice[t]["val_by_steps"]
        steps = [s for s, _ in tried]
        assert steps == [m * budget for m in GRIDS["converged_multiple"][: len(steps)]]
        scores = [v for _, v in tried]
        # every budget but the last improved on the one before; the last tried either did not or ended the grid
        assert all(b > a for a, b in itertools.pairwise(scores[:-1]))
        assert len(steps) == len(GRIDS["converged_multiple"]) or scores[-1] <= scores[-2]
        best = max(range(len(scores)), key=lambda i: (scores[i], -i))
        assert choice[t]["steps"] == steps[best]
        # the chosen vector scores what the search recorded; the 1x candidate is individual's own run
        assert ctx.trainer.evaluate(vectors[t], t, ctx.val[t], ctx.cfg.eval_batch_size) == pytest.approx(scores[best])
        if choice[t]["steps"] == budget:
            assert torch.equal(vectors[t], same_budget[t])


def test_converged_reference_runs_as_a_method_and_records_its_choice(ctx):
    res = run(ctx, "individual_converged", log=lambda *_: None)
    _, choice = converged_task_vectors(ctx)
    assert set(res.final["acc"]) == set(ctx.tasks)
    assert res.history[-1]["info"]["steps_chosen_on_val"] == choice


def _rows(acc_by_method):
    return [{"method": m, "acc": acc} for m, acc in acc_by_method.items()]


def test_seed_summary_normalises_against_the_converged_reference_too():
    chance = {"a": 0.1, "b": 0.5}
    rows = {
        s: _rows(
            {
                "individual": {"a": 0.6, "b": 0.9},
                "individual_converged": {"a": 0.7, "b": 0.9},
                "matu": {"a": 0.55, "b": 0.8},
            }
        )
        for s in (0, 1)
    }
    summary = aggregate_seeds(rows, chance, n_boot=200)
    assert summary["converged_reference"] == "individual_converged"
    matu = summary["methods"]["matu"]
    # (0.55 - 0.1) / (0.7 - 0.1) and (0.8 - 0.5) / (0.9 - 0.5), averaged
    assert matu["mean_normalised_converged"][0] == pytest.approx((0.45 / 0.6 + 0.3 / 0.4) / 2)
    assert matu["mean_normalised"][0] == pytest.approx((0.45 / 0.5 + 0.3 / 0.4) / 2)
    without = aggregate_seeds(
        {s: [r for r in rows[s] if r["method"] != "individual_converged"] for s in rows}, chance, n_boot=200
    )
    assert without["converged_reference"] is None and "mean_normalised_converged" not in without["methods"]["matu"]
