"""Baselines are tuned on validation, from grids declared once (methods.GRIDS), and the choice is recorded.

The federated tests use the smoke preset cut to 1 round of 2 steps, 48 evaluation images per task and
2-value grids.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from matu_lib import comparison, merging, methods, tuning
from matu_lib.federation import build_context, run
from matu_lib.presets import RunConfig, preset


@pytest.fixture(scope="module")
def ctx():
    """Smoke, 1 round of 2 steps, 48 validation and test images per task: these tests check what is selected,
    recorded and reported, not accuracy, and the one-shot selection evaluates every grid point."""
    full = build_context(preset("smoke", rounds=1, local_steps=2, merge_coefs=None), log=lambda *_: None)
    cut = {split: {t: (x[:48], y[:48]) for t, (x, y) in getattr(full, split).items()} for split in ("val", "test")}
    return replace(full, **cut)


def quiet(*_):
    pass


# --------------------------------------------------------------------------------- grids declared once


def test_grids_are_declared_once_and_used():
    assert methods.GRIDS["merge_coef"] is merging.COEF_GRID
    assert methods.GRIDS["tall_lambda"] is merging.LAMBDA_GRID
    assert RunConfig().merge_coefs is None  # the config does not repeat the grid
    for name, cls in methods.METHODS.items():  # every tuned field is a RunConfig field with a grid
        if cls.tuned_field:
            assert cls.tuned_field in methods.GRIDS and hasattr(RunConfig(), cls.tuned_field), name
    assert {m for m, c in methods.METHODS.items() if c.tuned_field} == {"fedprox", "matfl_grouping"}


# --------------------------------------------------------------------------------- selection logic (no training)


class FakeResult:
    def __init__(self, mean_acc: float):
        self.final = {"mean_acc": mean_acc}


def fake_runner(scores: dict, seen: list):
    def fake_run(ctx, method, out=None, **kwargs):
        seen.append((method, ctx.cfg.fedprox_mu, ctx.cfg.eval_split, ctx.cfg.tune_baselines, out))
        return FakeResult(scores[ctx.cfg.fedprox_mu])

    return fake_run


def test_select_on_validation_picks_best_validation_score(ctx, monkeypatch, tmp_path):
    seen: list = []
    monkeypatch.setattr(tuning, "run", fake_runner({0.001: 0.40, 0.01: 0.55, 0.1: 0.50}, seen))
    value, record = tuning.select_on_validation(
        ctx, "fedprox", grid=(0.001, 0.01, 0.1), out=tmp_path / "fedprox", log=quiet
    )
    assert value == 0.01
    assert record == {
        "field": "fedprox_mu",
        "grid": [0.001, 0.01, 0.1],
        "val_mean_acc": [0.40, 0.55, 0.50],
        "chosen": 0.01,
        "split": "val",
    }
    # one run per value, each on the validation split, none of them tuning again, each in its own folder
    assert [s[1] for s in seen] == [0.001, 0.01, 0.1]
    assert all(s[0] == "fedprox" and s[2] == "val" and s[3] is False for s in seen)
    assert [s[4] for s in seen] == [tmp_path / "fedprox-tuning" / f"fedprox_mu={v}" for v in (0.001, 0.01, 0.1)]


def test_select_on_validation_ties_defaults_and_errors(ctx, monkeypatch):
    seen: list = []
    monkeypatch.setattr(tuning, "run", fake_runner({0.001: 0.5, 0.01: 0.5, 0.1: 0.5}, seen))
    value, record = tuning.select_on_validation(ctx, "fedprox", grid=(0.1, 0.001), log=quiet)
    assert value == 0.1  # equal scores: the earliest grid value
    tuning.select_on_validation(ctx, "fedprox", log=quiet)  # no grid given: the declared one
    assert [s[1] for s in seen[2:]] == list(methods.GRIDS["fedprox_mu"])
    with pytest.raises(ValueError, match="no hyper-parameter grid.*tunable: \\['fedprox', 'matfl_grouping'\\]"):
        tuning.select_on_validation(ctx, "matu", log=quiet)
    with pytest.raises(KeyError, match="unknown method"):
        tuning.select_on_validation(ctx, "fedprocs", log=quiet)
    with pytest.raises(ValueError, match="empty grid"):
        tuning.select_on_validation(ctx, "fedprox", grid=(), log=quiet)
    monkeypatch.setattr(tuning, "run", fake_runner({0.1: float("nan")}, seen))
    with pytest.raises(ValueError, match="fedprox_mu=0.1 gave NaN"):
        tuning.select_on_validation(ctx, "fedprox", grid=(0.1,), log=quiet)


def test_cli_tune_flag_sets_the_config(monkeypatch, tmp_path):
    from matu_lib.__main__ import main

    got = {}

    def fake_compare_seeds(cfg, seeds, methods, out, **kwargs):  # what the CLI hands over, without training
        got["cfg"] = cfg
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.md").write_text("")
        return {}

    monkeypatch.setattr(comparison, "compare_seeds", fake_compare_seeds)
    assert main(["compare", "--preset", "smoke", "--tune", "--methods", "fedprox", "--out", str(tmp_path / "a")]) == 0
    assert got.pop("cfg").tune_baselines is True
    assert main(["compare", "--preset", "smoke", "--methods", "fedprox", "--out", str(tmp_path / "b")]) == 0
    assert got.pop("cfg").tune_baselines is False


# --------------------------------------------------------------------------------- iterative baselines, smoke


def test_tuned_run_records_grid_and_reports_the_choice_on_test(ctx, monkeypatch, tmp_path):
    # ~40 s on 2 cores under load 8 (4 one-round runs): the only end-to-end check that the reported run is
    # the validation winner's test run; not marked slow so that `make test` keeps it.
    monkeypatch.setitem(methods.GRIDS, "matfl_groups", (1, 3))  # one group (FedAvg) vs one per client
    tuned = replace(ctx, cfg=replace(ctx.cfg, tune_baselines=True))
    out = tmp_path / "matfl_grouping"
    res = tuning.run_method(tuned, "matfl_grouping", out, log=quiet)
    record = res.final["tuning"]
    assert record["field"] == "matfl_groups" and record["grid"] == [1, 3]
    # the per-value scores are the validation runs' own results, and the choice is their argmax
    for value, score in zip(record["grid"], record["val_mean_acc"]):
        folder = tuning.tuning_folder(out) / f"matfl_groups={value}"
        config = json.loads((folder / "config.json").read_text())
        assert config["eval_split"] == "val" and config["matfl_groups"] == value
        assert json.loads((folder / "metrics.json").read_text())["final"]["mean_acc"] == score
    scores = record["val_mean_acc"]
    assert record["chosen"] == record["grid"][scores.index(max(scores))]
    # the reported run is the chosen value's test run, recorded with its selection
    config = json.loads((out / "config.json").read_text())
    assert config["matfl_groups"] == record["chosen"] and config["eval_split"] == "test"
    assert json.loads((out / "metrics.json").read_text())["final"]["tuning"] == record
    plain = run(replace(ctx, cfg=replace(ctx.cfg, matfl_groups=record["chosen"])), "matfl_grouping", log=quiet)
    assert plain.final["acc"] == res.final["acc"]
    # the plain runner refuses to skip the tuning it was asked for, rather than run untuned
    with pytest.raises(ValueError, match="tuning.run_method"):
        run(tuned, "matfl_grouping", tmp_path / "plain", log=quiet)
    # a second call reuses every finished run and reports the same
    again = tuning.run_method(tuned, "matfl_grouping", out, resume=True, log=quiet)
    assert again.final["acc"] == res.final["acc"] and again.final["tuning"] == record


def test_untuned_runs_stay_untuned(ctx, monkeypatch):
    calls = []
    monkeypatch.setattr(tuning, "run_tuned", lambda *a, **k: calls.append(a))
    plain = run(ctx, "fedprox", log=quiet)  # tune_baselines is off by default: the config's mu, no grid runs
    assert calls == [] and "tuning" not in plain.final
    run(replace(ctx, cfg=replace(ctx.cfg, tune_baselines=True)), "zero_shot", log=quiet)  # no grid: runs as it is
    assert calls == []


# --------------------------------------------------------------------------------- one-shot mergers, smoke


def test_tall_lambda_per_task_and_consensus_reuses_it(ctx, monkeypatch):
    # ~18 s on 2 cores under load 8: local fine-tuning of 9 pairs, then 5 x 4 + 2 x 4 validation evaluations
    c = replace(ctx, cache={})  # its own TALL selection
    monkeypatch.setitem(methods.GRIDS, "merge_coef", (0.3, 0.9))
    tall = run(c, "tall_masks", log=quiet)
    info = tall.history[-1]["info"]
    lam, grid_rows = info["selected"]["lam"], info["grid"]
    assert [row[0] for row in grid_rows] == [{"lam": x} for x in merging.LAMBDA_GRID]
    averaged = methods.per_task_averages(c)
    for i, t in enumerate(c.tasks):  # each task's lambda is the earliest best of its own validation row
        row = [r[1][t] for r in grid_rows]
        assert lam[t] == merging.LAMBDA_GRID[row.index(max(row))]
        # and the recorded score is what that task's masked model really scores on validation
        model = merging.tall_masks(averaged, lam=lam[t]).per_task(i)
        assert c.trainer.evaluate(model, t, c.val[t], 512) == pytest.approx(max(row))
    # the evaluated model is theta_0 + m_t * (unscaled sum), with each task's own lambda
    final = merging.tall_masks(averaged, lam=[lam[t] for t in c.tasks])
    models = methods.TallMasks(c)
    models.run_round(1, [0])
    for (_k, t), v in models.models().items():
        assert torch.equal(v, final.per_task(c.tasks.index(t)))

    cons = run(c, "consensus", log=quiet)
    info = cons.history[-1]["info"]
    assert info["selected"]["lam"] == lam and info["selected"]["k"] == 2
    assert [row[0] for row in info["grid"]] == [{"coef": 0.3}, {"coef": 0.9}]  # from GRIDS, not the config
    assert info["val_score"] == max(row[1] for row in info["grid"])
