"""The shipped pretrained tiny CLIP: integrity, the zero-shot figures in its manifest, and headroom."""

import math

import pytest

from matu_lib.backbones import checkpoint_dir, load_backbone, read_manifest, sha256_file
from matu_lib.data import get_task, load_task
from matu_lib.training import FinetuneConfig, accuracy, finetune

MANIFEST = read_manifest().get("matu-tiny", {})


def test_manifest_and_file_agree():
    assert MANIFEST, "data/pretrained/manifest.json has no matu-tiny entry"
    path = checkpoint_dir() / MANIFEST["file"]
    assert sha256_file(path) == MANIFEST["sha256"]
    assert path.stat().st_size <= 20 * 2**20
    for key in ("architecture", "recipe", "stats", "zero_shot_test_accuracy"):
        assert key in MANIFEST


@pytest.fixture(scope="module")
def tiny():
    return load_backbone("matu-tiny", "synthetic")


@pytest.mark.parametrize("task", ["printed_digits", "textures", "object_count"])
def test_zero_shot_accuracy_matches_manifest(tiny, task):
    data = load_task(task, seed=MANIFEST["recipe"]["seed"])
    head = tiny.head(data.spec.classes, data.spec.templates)
    acc = accuracy(tiny.classifier(head), data.split("test"))
    assert acc == pytest.approx(MANIFEST["zero_shot_test_accuracy"][task], abs=0.004)


def test_zero_shot_regime_is_above_chance_and_below_perfect():
    accs = MANIFEST["zero_shot_test_accuracy"]
    chance = {t: 1 / len(get_task(t).classes) for t in accs}
    above = sum(accs[t] > chance[t] + 0.05 for t in accs)
    assert above >= len(accs) // 2, f"only {above} of {len(accs)} tasks clearly above chance"
    assert MANIFEST["zero_shot_mean"] < 0.8


def test_finetuning_from_checkpoint_beats_zero_shot(tiny):
    data = load_task("mnist")
    head = tiny.head(data.spec.classes, data.spec.templates)
    model = tiny.classifier(head)
    before = accuracy(model, data.split("test"))
    finetune(model, data.split("train"), FinetuneConfig(steps=60, batch_size=64, lr=1e-3, warmup_steps=6), seed=0)
    after = accuracy(model, data.split("test"))
    assert after > before + 0.15 and not math.isnan(after)
