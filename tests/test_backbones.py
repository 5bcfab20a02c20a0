import time

import pytest
import torch

from matu_lib.backbones import BackboneUnavailable, build_clip, load_backbone, save_clip_checkpoint
from matu_lib.task_vectors import TaskVector
from matu_lib.training import FinetuneConfig, accuracy, finetune


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
        '{"matu-micro": {"file": "matu-micro.safetensors", "sha256": "%s"}}' % digest)
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
