"""The backbone study: probes, the learning rate chosen on validation, the learnt rule, the table."""

import math

import numpy as np
import pytest
import torch

from matu_lib import substrate_study as S
from matu_lib.federation import build_context
from matu_lib.presets import preset


def test_probe_chooses_on_validation_and_learns_a_separable_task():
    rng = np.random.default_rng(0)

    def split(n):
        y = rng.integers(0, 3, n)
        return rng.normal(size=(n, 5)) + 3 * np.eye(3, 5)[y], y

    val_acc, test_acc = S.probe(split(90), split(60), split(60))
    assert val_acc > 0.9 and test_acc > 0.9
    noise = [(rng.normal(size=(60, 5)), rng.integers(0, 3, 60)) for _ in range(3)]
    assert S.probe(*noise)[1] < 0.6  # nothing to learn: near chance (1/3), not fitted to test


def _run(tasks, individual):
    """A measured run with given per-task test/val accuracies per learning rate (the shape ``measure`` returns)."""
    return {
        "tasks": {
            t: {
                "chance": 0.1,
                "zero_shot": 0.2,
                "probe_features": 0.5,
                "probe_pixels": 0.4,
                "individual": {lr: {"val": v, "test": v + 0.01} for lr, v in individual[t].items()},
            }
            for t in tasks
        },
        "seconds_per_run": 2.0,
        "encoder_params": 10,
    }


def test_summary_takes_the_rate_best_on_validation_and_flags_unlearnt_tasks():
    runs = {
        "m": {
            0: _run(["a", "b"], {"a": {"0.001": 0.9, "0.002": 0.5}, "b": {"0.001": 0.25, "0.002": 0.3}}),
            1: _run(["a", "b"], {"a": {"0.001": 0.8, "0.002": 0.6}, "b": {"0.001": 0.27, "0.002": 0.3}}),
        }
    }
    s = S.summarise(runs)["m"]
    assert s["lr"] == 0.001  # mean val 0.555 against 0.425
    assert s["tasks"]["a"]["individual"][0] == pytest.approx(0.86)
    assert s["tasks"]["a"]["learnt"] and not s["tasks"]["b"]["learnt"]  # b: 0.27 < zero-shot 0.2 + 0.10
    assert s["learnt"] == 1 and s["means"]["individual"][0] == pytest.approx((0.91 + 0.26 + 0.81 + 0.28) / 4)
    text = S.format_summary({"m": s}, "smoke", "python -m matu_lib.substrate_study")
    assert "| b |" in text and "**no**" in text and "1 of 2" in text


@pytest.mark.slow
def test_measure_on_a_small_preset_reports_every_task():
    cfg = preset("smoke", tasks=("mnist", "textures"), rounds=1, local_steps=2, max_train_per_task=64)
    ctx = build_context(cfg, log=lambda _: None)
    out = S.measure(ctx, lrs=(1e-3,), log=lambda _: None)
    assert set(out["tasks"]) == {"mnist", "textures"}
    for task, row in out["tasks"].items():
        assert row["chance"] in (0.1, 1 / 7) and 0 <= row["zero_shot"] <= 1
        assert row["steps"] == 1 * 2 * len(ctx.holders(task)) > 2  # the individual method's budget: pooled shards
        assert not math.isnan(row["individual"]["0.001"]["test"])
    assert out["tasks"]["mnist"]["probe_pixels"] > 0.3  # well above chance (0.1): pixels separate digits
    assert all(math.isnan(row["probe_trunk"]) for row in out["tasks"].values())  # a ViT has no separate trunk


def test_trunk_features_are_what_the_projection_maps_to_the_embedding():
    """The trunk probe reads the packaged trunk's pooled features: the tower's embedding is their projection."""
    ctx = build_context(
        preset("smoke", model="matu-lite0", pretrained="imagenet", tasks=("mnist", "textures"), max_train_per_task=16),
        log=lambda _: None,
    )
    images = ctx.test["mnist"][0][:8]
    trunk = S.trunk_features(ctx.trainer, "mnist", images)
    embedding = S.embeddings(ctx.trainer, "mnist", images)
    assert trunk.shape == (8, 1280) and embedding.shape == (8, 128)
    head = ctx.trainer.model(None, "mnist").visual.head
    with torch.no_grad():
        projected = head(torch.from_numpy(trunk)).numpy()
    assert np.allclose(projected, embedding, atol=1e-5)


def test_reformat_rewrites_the_table_from_saved_numbers_and_refuses_other_files(tmp_path, capsys):
    import json

    runs = {"m": {"0": _run(["a"], {"a": {"0.001": 0.5, "0.002": 0.7}})}}
    saved = tmp_path / "saved.json"
    saved.write_text(
        json.dumps({"command": "python -m matu_lib.substrate_study --seeds 0", "preset": "cpu", "runs": runs})
    )
    out = tmp_path / "out.md"
    assert S.main(["--reformat", str(saved), "--results", str(out)]) == 0
    text = out.read_text()
    assert "python -m matu_lib.substrate_study --seeds 0" in text and "| a |" in text
    assert "largest of the grid" in text  # 0.002 chosen, the edge of what was tried
    assert json.loads(out.with_suffix(".json").read_text())["summary"]["m"]["lr"] == 0.002
    bad = tmp_path / "bad.json"
    bad.write_text('{"history": []}')
    with pytest.raises(SystemExit) as exit_info:
        S.main(["--reformat", str(bad)])
    assert exit_info.value.code == 2 and "not a substrate study's numbers" in capsys.readouterr().err
