"""The shipped pretrained CLIPs (matu-tiny, matu-small, matu-lite0): integrity, the zero-shot figures in their manifest,
the recipe `python -m matu_lib.pretrain` rebuilds them with, and headroom."""

import math

import pytest

from matu_lib.backbones import PACKAGED_TRUNKS, TRUNK_PREFIX, checkpoint_dir, load_backbone, read_manifest, sha256_file
from matu_lib.data import get_task, load_task
from matu_lib.pretrain import default_recipe
from matu_lib.training import FinetuneConfig, accuracy, finetune

SHIPPED = ("matu-tiny", "matu-small", "matu-lite0")
MANIFEST = read_manifest()


@pytest.mark.parametrize("name", SHIPPED)
def test_manifest_and_file_agree(name):
    entry = MANIFEST.get(name)
    assert entry, f"data/pretrained/manifest.json has no {name} entry"
    path = checkpoint_dir() / entry["file"]
    assert sha256_file(path) == entry["sha256"]
    assert path.stat().st_size <= 20 * 2**20
    for key in ("architecture", "recipe", "stats", "zero_shot_test_accuracy"):
        assert key in entry


@pytest.mark.parametrize("name", SHIPPED)
def test_the_default_recipe_is_the_shipped_one(name):
    # `python -m matu_lib.pretrain --model NAME` must rebuild what ships, not a differently trained encoder
    assert MANIFEST[name]["recipe"] == default_recipe(name).__dict__


@pytest.mark.parametrize("name", [n for n in SHIPPED if n in PACKAGED_TRUNKS])
def test_a_packaged_trunk_is_not_shipped_twice(name):
    from safetensors import safe_open

    with safe_open(checkpoint_dir() / MANIFEST[name]["file"], "pt") as f:
        keys = list(f.keys())
    assert keys and not any(k.startswith(TRUNK_PREFIX) for k in keys)


@pytest.fixture(scope="module", params=SHIPPED)
def shipped(request):
    return request.param, load_backbone(request.param, "synthetic")


@pytest.mark.parametrize("task", ["printed_digits", "textures", "object_count"])
def test_zero_shot_accuracy_matches_manifest(shipped, task):
    name, backbone = shipped
    data = load_task(task, seed=MANIFEST[name]["recipe"]["seed"])
    head = backbone.head(data.spec.classes, data.spec.templates)
    acc = accuracy(backbone.classifier(head), data.split("test"))
    assert acc == pytest.approx(MANIFEST[name]["zero_shot_test_accuracy"][task], abs=0.004)


@pytest.mark.parametrize("name", SHIPPED)
def test_zero_shot_regime_is_above_chance_and_below_perfect(name):
    accs = MANIFEST[name]["zero_shot_test_accuracy"]
    chance = {t: 1 / len(get_task(t).classes) for t in accs}
    above = sum(accs[t] > chance[t] + 0.05 for t in accs)
    assert above >= len(accs) // 2, f"only {above} of {len(accs)} tasks clearly above chance"
    assert MANIFEST[name]["zero_shot_mean"] < 0.8


def test_finetuning_from_checkpoint_beats_zero_shot(shipped):
    _, backbone = shipped
    data = load_task("mnist")
    head = backbone.head(data.spec.classes, data.spec.templates)
    model = backbone.classifier(head)
    before = accuracy(model, data.split("test"))
    finetune(model, data.split("train"), FinetuneConfig(steps=60, batch_size=64, lr=1e-3, warmup_steps=6), seed=0)
    after = accuracy(model, data.split("test"))
    assert after > before + 0.15 and not math.isnan(after)
