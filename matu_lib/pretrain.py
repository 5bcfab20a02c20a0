"""Pretrain a tiny open_clip model CLIP-style on the project's captioned synthetic corpus.

No CLIP weights can be downloaded on the offline machines, so the workbook makes its own "pretrained"
starting point theta_0: both towers trained with the symmetric contrastive loss on generated images
with captions ("the digit seven printed in blue", "a red triangle on a striped background"). The corpus
is generated with its own seeds and never contains the downstream tasks' splits, so zero-shot accuracy
on the suite is a genuine transfer measurement.

    python -m matu_lib.pretrain --model matu-tiny     # the shipped recipe; the manifest records its time
    python -m matu_lib.pretrain --model matu-small    # the larger shipped encoder, same recipe
    python -m matu_lib.pretrain --model matu-lite0    # text tower aligned to the locked ImageNet trunk (LiT)

A model whose image trunk ships pretrained in a package (``backbones.PACKAGED_TRUNKS``) is aligned the LiT way
(Zhai et al., CVPR 2022): the trunk stays locked at its ImageNet weights, its pooled features of the corpus are
computed once, and only the text tower, the image projection and the logit scale learn. The checkpoint then
leaves the trunk out (its package holds it).

writes ``data/pretrained/<model>.safetensors`` and updates ``data/pretrained/manifest.json``
(architecture, recipe, seed, sha256, time taken, zero-shot accuracy per task).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .backbones import (
    CONFIG_DIR,
    IMAGENET_TAG,
    PACKAGED_TRUNKS,
    TRUNK_PREFIX,
    build_clip,
    checkpoint_dir,
    load_backbone,
    read_manifest,
    save_clip_checkpoint,
)


@dataclass(frozen=True)
class PretrainConfig:
    # The recipe of every shipped checkpoint (data/pretrained/manifest.json records it per model), so
    # `python -m matu_lib.pretrain --model NAME` rebuilds the shipped file (up to float noise across CPUs).
    model: str = "matu-tiny"
    n_images: int = 120_000
    steps: int = 800
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 50
    init_logit_scale: float = math.log(30.0)  # CLIP's ln(1/0.07) learns too slowly in a short run
    seed: int = 0


def default_recipe(model: str) -> PretrainConfig:
    """The recipe each shipped checkpoint was made with (the manifest records it; a test keeps them equal).

    A locked trunk leaves only the text tower and a projection to train on precomputed features, so its
    recipe takes more steps at a higher rate on fewer images (each image costs a 64-px trunk forward)."""
    if model in PACKAGED_TRUNKS:
        return PretrainConfig(model=model, n_images=60_000, steps=2000, lr=2e-3, warmup_steps=100)
    return PretrainConfig(model=model)


def clip_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of matching image/text pairs."""
    img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    logits = logit_scale.exp().clamp(max=100) * img @ txt.T
    labels = torch.arange(len(img), device=img.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


@torch.no_grad()
def locked_image_features(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Pooled trunk features [N, D] of uint8 images, preprocessed exactly as fine-tuning preprocesses them."""
    from .backbones import ImageClassifier

    visual = model.visual.eval()
    cfg = visual.preprocess_cfg
    size = int(visual.image_size[0] if isinstance(visual.image_size, (tuple, list)) else visual.image_size)
    prep = ImageClassifier(torch.nn.Identity(), torch.zeros(1, 1), 1.0, size, cfg["mean"], cfg["std"])
    return torch.cat(
        [visual.trunk(prep.preprocess(images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
    )


def _schedule(cfg: PretrainConfig):
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)))

    return factor


def pretrain(cfg: PretrainConfig, log_every: int = 50) -> tuple[torch.nn.Module, dict]:
    """Contrastive training on the captioned corpus: both towers from random init, or, for a model with a packaged
    trunk, LiT (the trunk locked at its ImageNet weights, its pooled features computed once; the text tower, the
    image projection and the logit scale learn)."""
    import open_clip

    from .data import make_corpus

    locked = cfg.model in PACKAGED_TRUNKS
    torch.manual_seed(cfg.seed)  # open_clip initialises weights from the global generator
    model = build_clip(cfg.model, pretrained=IMAGENET_TAG if locked else None)
    with torch.no_grad():
        model.logit_scale.fill_(cfg.init_logit_scale)
    t0 = time.perf_counter()
    images, captions = make_corpus(cfg.n_images, seed=cfg.seed)
    tokens = open_clip.get_tokenizer(cfg.model)(captions)
    if locked:
        pooled = locked_image_features(model, images)
        for name, p in model.named_parameters():
            p.requires_grad_(not name.startswith(TRUNK_PREFIX))
        params = [p for p in model.parameters() if p.requires_grad]

        def embed_images(idx: torch.Tensor) -> torch.Tensor:
            return model.visual.head(pooled[idx])
    else:
        mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
        params = list(model.parameters())

        def embed_images(idx: torch.Tensor) -> torch.Tensor:
            return model.encode_image((images[idx].float() / 255.0 - mean) / std)

    t_data = time.perf_counter() - t0

    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg))
    gen = torch.Generator().manual_seed(cfg.seed)
    order, pos, losses = torch.randperm(len(images), generator=gen), 0, []
    model.train()
    t1 = time.perf_counter()
    for step in range(cfg.steps):
        if pos + cfg.batch_size > len(order):
            order, pos = torch.randperm(len(images), generator=gen), 0
        idx = order[pos : pos + cfg.batch_size]
        pos += cfg.batch_size
        loss = clip_loss(embed_images(idx), model.encode_text(tokens[idx]), model.logit_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if log_every and (step % log_every == 0 or step == cfg.steps - 1):
            print(
                f"step {step:5d}/{cfg.steps}  loss {loss.item():.3f}  "
                f"logit scale {model.logit_scale.exp().item():.1f}  {time.perf_counter() - t1:.0f}s",
                flush=True,
            )
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    stats = {
        "data_seconds": round(t_data, 1),
        "train_seconds": round(time.perf_counter() - t1, 1),
        "first_loss": losses[0],
        "final_loss": sum(losses[-20:]) / min(20, len(losses)),
        "final_logit_scale": float(model.logit_scale.detach().exp()),
    }
    return model, stats


def zero_shot_report(
    model_name: str, pretrained: str, tasks: list[str] | None = None, seed: int = 0
) -> dict[str, float]:
    """Zero-shot test accuracy per task of a backbone (absolute accuracy in [0, 1])."""
    from .data import load_suite
    from .training import accuracy

    backbone = load_backbone(model_name, pretrained)
    out = {}
    for name, task in load_suite(tasks, seed=seed).items():
        head = backbone.head(task.spec.classes, task.spec.templates)
        out[name] = round(accuracy(backbone.classifier(head), task.split("test")), 4)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for key, value in asdict(PretrainConfig()).items():
        # None: the model's own recipe (default_recipe) decides
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=None if key != "model" else value)
    parser.add_argument("--out", type=Path, default=None, help="checkpoint folder (default data/pretrained)")
    parser.add_argument("--threads", type=int, default=None)
    args = vars(parser.parse_args(argv))
    out, threads = args.pop("out") or checkpoint_dir(), args.pop("threads")
    if threads:
        torch.set_num_threads(threads)
    given = {k: v for k, v in args.items() if v is not None}
    cfg = PretrainConfig(**{**asdict(default_recipe(args["model"])), **given})
    model, stats = pretrain(cfg)
    out.mkdir(parents=True, exist_ok=True)
    file = f"{cfg.model}.safetensors"
    digest = save_clip_checkpoint(model, out / file, leave_out=TRUNK_PREFIX if cfg.model in PACKAGED_TRUNKS else None)
    manifest = read_manifest(out)
    manifest[cfg.model] = {"file": file, "sha256": digest}  # written before the report so loading works
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    os.environ["MATU_CHECKPOINT_DIR"] = str(out)
    report = zero_shot_report(cfg.model, "synthetic", seed=cfg.seed)
    manifest[cfg.model] = {
        "file": file,
        "sha256": digest,
        "architecture": json.loads((CONFIG_DIR / f"{cfg.model}.json").read_text()),
        "recipe": asdict(cfg),
        "stats": stats,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "zero_shot_test_accuracy": report,
        "zero_shot_mean": round(sum(report.values()) / len(report), 4),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(json.dumps({k: manifest[cfg.model][k] for k in ("sha256", "stats", "zero_shot_mean")}, indent=2))


if __name__ == "__main__":
    main()
