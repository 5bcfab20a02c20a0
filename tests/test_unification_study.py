"""The unification study: per-tensor rescalers, re-unifying per-task FedAvg's averages, the summary, the CLI."""

import json

import pytest
import torch

from matu_lib.federation import build_context, run
from matu_lib.modulators import reconstruct, rescaler, tensor_rescalers, unify
from matu_lib.presets import preset
from matu_lib.results_folder import CheckpointError
from matu_lib.unification_study import ROWS, final_task_vectors, format_study, main, study_seed, summarise, unified_once


def test_tensor_rescalers_by_hand():
    # two tensors of 2 and 3 entries; the mask drops entry 1 and entry 4
    vector = torch.tensor([1.0, -2.0, 3.0, 1.0, -1.0])
    unified = torch.tensor([2.0, 5.0, 1.0, 1.0, 4.0])
    mask = torch.tensor([True, False, True, True, False])
    lam = tensor_rescalers(vector, mask, unified, [2, 3])
    # tensor 0: |1| + |-2| = 3 over |2| = 2 -> 1.5; tensor 1: 3 + 1 + 1 = 5 over 1 + 1 = 2 -> 2.5
    assert lam.tolist() == [1.5, 2.5]
    rec = reconstruct(unified, mask, lam, [2, 3])
    assert rec.tolist() == [3.0, 0.0, 2.5, 2.5, 0.0]
    # one tensor: the same as EMR's single rescaler; a tensor the mask leaves empty gets the neutral 1.0
    assert tensor_rescalers(vector, mask, unified, [5]).item() == pytest.approx(rescaler(vector, mask, unified))
    empty = tensor_rescalers(vector, torch.tensor([False, False, True, True, True]), unified, [2, 3])
    assert empty[0].item() == 1.0


def test_tensor_rescalers_keep_each_tensors_l1_norm():
    g = torch.Generator().manual_seed(0)
    vecs = [torch.randn(60, generator=g) * s for s in (1.0, 0.1, 3.0)]
    sizes = [10, 30, 20]
    unified, masks, _ = unify(vecs)
    for v, m in zip(vecs, masks):
        rec = reconstruct(unified, m, tensor_rescalers(v, m, unified, sizes), sizes)
        for a, b in zip(rec.split(sizes), v.split(sizes)):
            assert a.abs().sum().item() == pytest.approx(b.abs().sum().item(), rel=1e-5)


def test_tensor_rescalers_and_reconstruct_refuse_mismatched_sizes():
    v = torch.ones(5)
    with pytest.raises(ValueError, match="tensor sizes"):
        tensor_rescalers(v, torch.ones(5, dtype=torch.bool), v, [2, 2])
    with pytest.raises(ValueError, match="3 rescalers for 2 tensors"):
        reconstruct(v, torch.ones(5, dtype=torch.bool), torch.ones(3), [2, 3])
    with pytest.raises(ValueError, match="finite"):
        reconstruct(v, torch.ones(5, dtype=torch.bool), torch.tensor([1.0, float("nan")]), [2, 3])


TINY = dict(rounds=1, local_steps=2, eval_split="val")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A smoke context whose individual, per-task FedAvg and MaTU runs are finished in ``folder``."""
    ctx = build_context(preset("smoke", **TINY), log=lambda *_: None)
    folder = tmp_path_factory.mktemp("unify")
    return ctx, folder, study_seed(ctx, folder, log=lambda *_: None)


def test_one_task_clients_reconstruct_their_average_exactly():
    # every client holds one task: unifying one vector gives it back, so "once" is per-task FedAvg itself
    ctx = build_context(
        preset("smoke", **TINY, n_clients=4, tasks_per_client=(1, 1), min_clients_per_task=1), log=lambda *_: None
    )
    g = torch.Generator().manual_seed(1)
    vectors = {t: torch.randn(ctx.trainer.n_params, generator=g) for t in ctx.tasks}
    for models in unified_once(ctx, vectors).values():
        for (k, t), (model, cos) in models.items():
            assert t in ctx.clients[k].tasks
            assert torch.allclose(model, vectors[t], rtol=1e-6, atol=0) and cos == pytest.approx(1.0, abs=1e-5)


def test_study_seed_reads_the_finished_runs(finished):
    ctx, folder, res = finished
    assert set(res["acc"]) == set(ROWS) and set(res["cosine"]) == {"once", "once_tensor"}
    ptf = json.loads((folder / "per_task_fedavg" / "metrics.json").read_text())["final"]["acc"]
    assert res["acc"]["per_task_fedavg"] == ptf  # reused, not retrained
    for name in ("once", "once_tensor"):  # two tasks per client: a lossy reconstruction, never the average
        assert set(res["acc"][name]) == set(ctx.tasks)
        assert all(0 < c < 0.9999 for c in res["cosine"][name].values())
    # the vectors unified are the run's own: evaluating them as they are gives per-task FedAvg's accuracy
    vectors = final_task_vectors(ctx, folder / "per_task_fedavg")
    t = ctx.tasks[0]
    assert ctx.trainer.evaluate(vectors[t], t, ctx.val[t], 512) == pytest.approx(ptf[t], abs=1e-6)


def test_summary_pairs_the_rows(finished):
    ctx, _, res = finished
    other = json.loads(json.dumps(res))
    other["acc"]["matu"] = {t: a + 0.01 for t, a in res["acc"]["matu"].items()}
    summary = summarise({0: res, 1: other}, ctx.cfg, n_boot=200)
    diffs = {(d["a"], d["b"]): d for d in summary["differences"]}
    once = diffs[("once", "per_task_fedavg")]["acc"]
    expected = sum(res["acc"]["once"][t] - res["acc"]["per_task_fedavg"][t] for t in ctx.tasks) / len(ctx.tasks)
    assert once["mean"] == pytest.approx(expected)
    assert diffs[("matu", "once")]["acc"]["per_seed"][1] == pytest.approx(
        diffs[("matu", "once")]["acc"]["per_seed"][0] + 0.01
    )
    text = format_study(summary, "cmd")
    assert "what one unification costs" in text and "Written by `cmd`" in text


def test_an_unfinished_or_corrupt_run_is_refused(tmp_path):
    ctx = build_context(preset("smoke", **{**TINY, "rounds": 2}), log=lambda *_: None)
    run(ctx, "per_task_fedavg", tmp_path / "ptf", stop_after=1, log=lambda *_: None)
    with pytest.raises(ValueError, match="holds 1 of 2 rounds"):
        final_task_vectors(ctx, tmp_path / "ptf")
    ck = tmp_path / "ptf" / "checkpoint" / "checkpoint.safetensors"
    ck.write_bytes(ck.read_bytes()[:-16] + b"\0" * 16)
    with pytest.raises(CheckpointError, match="checkpoint"):
        final_task_vectors(ctx, tmp_path / "ptf")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--preset", "smoke", "--set", "seed=1"], "--seeds"),
        (["--preset", "smoke", "--seeds", "0", "0"], "distinct"),
        (["--preset", "smoke", "--results", "x.txt"], ".md"),
        (["--preset", "smoke", "--set", "no_such_field=1"], "no_such_field"),
    ],
)
def test_cli_refuses_bad_arguments_before_any_work(argv, message, capsys, tmp_path):
    assert main([*argv, "--out", str(tmp_path / "runs")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
