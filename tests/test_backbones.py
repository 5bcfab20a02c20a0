import json
import time

import pytest
import torch

from matu_lib.backbones import IMAGENET_TAG, BackboneUnavailable, build_clip, load_backbone, save_clip_checkpoint
from matu_lib.task_vectors import TaskVector
from matu_lib.training import FinetuneConfig, accuracy, finetune, predict


def test_project_models_register_and_build():
    for name, lo, hi in [("matu-micro", 5e4, 2e5), ("matu-tiny", 1.5e5, 3e5), ("matu-small", 6e5, 1e6)]:
        model = build_clip(name)
        n = sum(p.numel() for p in model.visual.parameters())
        assert lo < n < hi, (name, n)


def test_checkpoint_round_trip_through_open_clip(tmp_path):
    model = build_clip("matu-micro")
    path = tmp_path / "micro.safetensors"
    save_clip_checkpoint(model, path)
    loaded = build_clip("matu-micro", str(path))
    ref, new = model.state_dict(), loaded.state_dict()
    assert ref.keys() == new.keys() and all(torch.equal(ref[k], new[k]) for k in ref)


def test_corrupted_local_checkpoint_is_refused(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(BackboneUnavailable, match="Could not load weights"):
        build_clip("matu-micro", str(path))
    with pytest.raises(BackboneUnavailable, match="does not exist"):
        build_clip("matu-micro", str(tmp_path / "missing.safetensors"))


def test_shipped_checkpoint_checksum_is_enforced(tmp_path, monkeypatch):
    model = build_clip("matu-micro")
    digest = save_clip_checkpoint(model, tmp_path / "matu-micro.safetensors")
    (tmp_path / "manifest.json").write_text(
        json.dumps({"matu-micro": {"file": "matu-micro.safetensors", "sha256": digest}})
    )
    monkeypatch.setenv("MATU_CHECKPOINT_DIR", str(tmp_path))
    assert load_backbone("matu-micro", "synthetic").name == "matu-micro"
    blob = bytearray((tmp_path / "matu-micro.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (tmp_path / "matu-micro.safetensors").write_bytes(bytes(blob))
    with pytest.raises(BackboneUnavailable, match="corrupted or was replaced"):
        load_backbone("matu-micro", "synthetic")


def test_unknown_names_fail_clearly():
    with pytest.raises(ValueError, match="Unknown model"):
        build_clip("no-such-model")
    with pytest.raises(ValueError, match="no pretrained tag 'nope'"):
        build_clip("ViT-B-32", "nope")


def test_hub_weights_fail_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(BackboneUnavailable, match="local checkpoint path"):
        build_clip("ViT-B-32", "openai")
    assert time.perf_counter() - start < 30  # generous: the point is no minute of retries


def test_vit_b32_builds_offline_and_runs_forward():
    bb = load_backbone("ViT-B-32", pretrained=None)
    head = bb.head(("cat", "dog"), ("a photo of a {}.",))
    clf = bb.classifier(head)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)  # resized to 224 inside
    with torch.no_grad():
        logits = clf(images)
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()


def test_zero_shot_head_is_normalised_and_cached(micro_backbone):
    head = micro_backbone.head(("zero", "one", "two"), ("a {}.", "the digit {}."))
    assert head.shape == (3, micro_backbone.model.visual.output_dim)
    assert torch.allclose(head.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert micro_backbone.head(("zero", "one", "two"), ("a {}.", "the digit {}.")) is head
    single = micro_backbone.head(("zero", "one", "two"), ("a {}.",))
    assert not torch.allclose(single, head)


def test_finetuning_raises_accuracy_and_is_deterministic(micro_backbone, toy_task):
    train, test = toy_task
    head = micro_backbone.head(("bright", "dark"), ("a {} image.",))
    cfg = FinetuneConfig(steps=40, batch_size=64, lr=3e-3, warmup_steps=4)
    runs = []
    for _ in range(2):
        clf = micro_backbone.classifier(head)
        before = accuracy(clf, test)
        finetune(clf, train, cfg, seed=3)
        runs.append((before, accuracy(clf, test), TaskVector.from_weights(micro_backbone.encoder_state(), clf.visual)))
    (before, after, tau), (_, after2, tau2) = runs
    assert after > max(before, 0.5) + 0.2
    assert after == after2 and (tau - tau2).norm() == 0.0
    assert tau.norm() > 0
    # theta_0 is untouched by fine-tuning a copy
    assert TaskVector.from_weights(micro_backbone.encoder_state(), micro_backbone.model.visual).norm() == 0.0


# ---- a packaged ImageNet trunk (matu-lite0): frozen stem, tuned rest, frozen batch-norm statistics


@pytest.fixture(scope="module")
def lite_backbone():
    return load_backbone("matu-lite0", IMAGENET_TAG)


def test_lite_stem_and_tuned_trunk_compose_to_the_open_clip_tower(lite_backbone):
    head = torch.nn.functional.normalize(torch.randn(5, 128, generator=torch.Generator().manual_seed(0)), dim=-1)
    clf = lite_backbone.classifier(head)
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        direct = torch.nn.functional.normalize(lite_backbone.model.encode_image(clf.preprocess(images)), dim=-1)
        assert torch.allclose(clf.features(images), direct, atol=1e-6)
    # the task vector covers the tuned part only: the stem is not fine-tuned and holds most of the computation
    tuned = sum(p.numel() for p in lite_backbone.encoder.parameters())
    assert set(lite_backbone.encoder_state()) == {k for k, _ in lite_backbone.encoder.named_parameters()}
    assert 1.0e6 < tuned < 1.4e6 and not any(p.requires_grad for p in clf.stem.parameters())


def test_lite_finetuning_keeps_batch_norm_statistics_and_the_stem(lite_backbone, toy_task):
    train, _ = toy_task
    head = torch.nn.functional.normalize(torch.randn(2, 128, generator=torch.Generator().manual_seed(0)), dim=-1)
    clf = lite_backbone.classifier(head)
    buffers = {k: v.clone() for k, v in clf.named_buffers() if "running" in k}
    stem = {k: v.clone() for k, v in clf.stem.state_dict().items()}
    before = TaskVector.from_weights(lite_backbone.encoder_state(), clf.visual)
    finetune(clf, train, FinetuneConfig(steps=8, batch_size=32, lr=1e-3, warmup_steps=1), seed=0)
    after = TaskVector.from_weights(lite_backbone.encoder_state(), clf.visual)
    assert before.norm() == 0.0 and after.norm() > 0  # parameters moved ...
    assert all(torch.equal(v, dict(clf.named_buffers())[k]) for k, v in buffers.items())  # ... statistics did not
    assert all(torch.equal(v, clf.stem.state_dict()[k]) for k, v in stem.items())
    assert not any(m.training for m in clf.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))
    again = lite_backbone.classifier(head)  # same seed, same task vector
    finetune(again, train, FinetuneConfig(steps=8, batch_size=32, lr=1e-3, warmup_steps=1), seed=0)
    assert (TaskVector.from_weights(lite_backbone.encoder_state(), again.visual) - after).norm() == 0.0


def test_prepared_inputs_are_cached_per_split_and_give_the_same_predictions(lite_backbone, micro_backbone, toy_task):
    _, (x, y) = toy_task
    for backbone, dim in ((lite_backbone, 128), (micro_backbone, 64)):
        clf = backbone.classifier(torch.nn.functional.normalize(torch.randn(2, dim), dim=-1))
        with torch.no_grad():
            direct = clf(x).argmax(-1)
        pred, _ = predict(clf, (x, y), batch_size=50)
        assert torch.equal(pred, direct)
    clf = lite_backbone.classifier(torch.nn.functional.normalize(torch.randn(2, 128), dim=-1))
    first = clf.prepare_split(x)
    assert clf.prepare_split(x) is first  # the same tensor: computed once
    assert clf.prepare_split(x.clone()) is not first  # equal contents, another tensor: computed again
    assert torch.equal(clf.prepare_split(x.clone()), first)
    copy = x.clone()
    clf.prepare_split(copy)
    count = len(clf.cache)
    del copy
    assert len(clf.cache) == count - 1  # an entry goes with its tensor


def test_packaged_trunk_checksum_is_enforced(monkeypatch):
    import dataclasses

    from matu_lib import backbones

    bad = dataclasses.replace(backbones.PACKAGED_TRUNKS["matu-lite0"], sha256="0" * 64)
    monkeypatch.setitem(backbones.PACKAGED_TRUNKS, "matu-lite0", bad)
    with pytest.raises(BackboneUnavailable, match="do not match the expected sha256"):
        build_clip("matu-lite0", IMAGENET_TAG)
    gone = dataclasses.replace(bad, package="no_such_package_here")
    monkeypatch.setitem(backbones.PACKAGED_TRUNKS, "matu-lite0", gone)
    with pytest.raises(BackboneUnavailable, match="needs the package 'no_such_package_here'"):
        build_clip("matu-lite0", IMAGENET_TAG)


def test_lite_local_checkpoint_with_or_without_its_trunk_loads_back(lite_backbone, tmp_path):
    from matu_lib.backbones import TRUNK_PREFIX

    whole, text_only = tmp_path / "whole.safetensors", tmp_path / "text.safetensors"
    save_clip_checkpoint(lite_backbone.model, whole)
    save_clip_checkpoint(lite_backbone.model, text_only, leave_out=TRUNK_PREFIX)
    assert text_only.stat().st_size < whole.stat().st_size / 1.5
    ref = lite_backbone.model.state_dict()
    for path in (whole, text_only):
        loaded = build_clip("matu-lite0", str(path)).state_dict()
        assert loaded.keys() == ref.keys() and all(torch.equal(ref[k], loaded[k]) for k in ref)
    (tmp_path / "cut.safetensors").write_bytes(text_only.read_bytes()[:1000])
    with pytest.raises(BackboneUnavailable, match="Could not load weights"):
        build_clip("matu-lite0", str(tmp_path / "cut.safetensors"))


def test_truncated_manifest_is_one_line_before_any_work(tmp_path, monkeypatch, capsys):
    from matu_lib import federation
    from matu_lib.__main__ import main
    from matu_lib.backbones import checkpoint_dir, read_manifest
    from matu_lib.presets import ConfigError, check_runnable, preset

    text = (checkpoint_dir() / "manifest.json").read_text()
    (tmp_path / "manifest.json").write_text(text[: len(text) // 2])
    monkeypatch.setenv("MATU_CHECKPOINT_DIR", str(tmp_path))
    with pytest.raises(BackboneUnavailable, match="unreadable or truncated .*git checkout") as err:
        read_manifest()
    assert "\n" not in str(err.value) and str(tmp_path / "manifest.json") in str(err.value)
    with pytest.raises(ConfigError, match="pretrained='synthetic': .*manifest.json is unreadable"):
        check_runnable(preset("smoke"))
    monkeypatch.setattr(federation, "build_context", lambda *a, **k: pytest.fail("work started before the check"))
    assert main(["run", "--preset", "smoke", "--out", str(tmp_path / "out")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
