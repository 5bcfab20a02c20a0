"""CLIP backbones through open_clip: the project's tiny offline models and any open_clip model.

Everything is built by ``open_clip.create_model`` so the offline default and the paper-scale
``ViT-B-32``/``openai`` run share one code path. The project's own architectures live as open_clip
JSON configs in ``matu_lib/model_configs`` and are registered at import:

- ``matu-micro`` (~0.1 M image-encoder parameters, 8-px patches): unit tests.
- ``matu-tiny``  (~0.2 M, width 64 x 4 layers, 4-px patches): the workbook's CPU runs. Chosen over a
  0.8 M encoder because it trains ~3x faster on two cores, which is what lets the whole workbook run
  in minutes; its small capacity also makes task interference visible, the thing MaTU addresses.
- ``matu-small`` (~0.8 M, width 128 x 4 layers): for analysts with more time.

``pretrained`` accepts ``None`` (random init), ``"synthetic"`` (the checkpoint shipped in ``data/pretrained``,
sha256-checked), an open_clip tag such as ``"openai"`` (needs the network once), or a path to a local
checkpoint file (safetensors or a plain state dict).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

CONFIG_DIR = Path(__file__).parent / "model_configs"
PROJECT_MODELS = ("matu-micro", "matu-tiny", "matu-small")
SHIPPED_TAG = "synthetic"

open_clip.add_model_config(CONFIG_DIR)


class BackboneUnavailable(RuntimeError):
    """Raised when weights cannot be obtained (offline, missing file, checksum mismatch)."""


def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


def checkpoint_dir() -> Path:
    """Folder of shipped checkpoints; ``MATU_CHECKPOINT_DIR`` overrides it (e.g. for a wheel install)."""
    return Path(os.environ.get("MATU_CHECKPOINT_DIR", repo_root() / "data" / "pretrained"))


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(directory: Path | None = None) -> dict:
    path = (directory or checkpoint_dir()) / "manifest.json"
    if not path.exists():
        return {}
    return json.loads(path.read_text())


def shipped_checkpoint(name: str) -> Path:
    """Path of the shipped checkpoint for ``name`` after verifying its sha256 against the manifest."""
    directory = checkpoint_dir()
    entry = read_manifest(directory).get(name)
    if entry is None:
        raise BackboneUnavailable(
            f"No shipped '{SHIPPED_TAG}' checkpoint for model '{name}' in {directory}/manifest.json. "
            f"Create one with `python -m matu_lib.pretrain --model {name}`, or pass pretrained=None."
        )
    path = directory / entry["file"]
    if not path.exists():
        raise BackboneUnavailable(f"Checkpoint file {path} listed in the manifest is missing.")
    digest = sha256_file(path)
    if digest != entry["sha256"]:
        raise BackboneUnavailable(
            f"Checkpoint {path} is corrupted or was replaced: sha256 {digest[:12]}... does not match the "
            f"manifest's {entry['sha256'][:12]}...; restore it with `git checkout -- {path.name}` or re-run "
            f"`python -m matu_lib.pretrain --model {name}`."
        )
    return path


def _resolve_weights(name: str, pretrained: str | None) -> tuple[str | None, str]:
    """Map the user's ``pretrained`` argument to what open_clip receives and a description."""
    if pretrained is None:
        return None, "random init"
    if pretrained == SHIPPED_TAG:
        return str(shipped_checkpoint(name)), f"shipped checkpoint ({SHIPPED_TAG})"
    looks_like_path = os.sep in pretrained or pretrained.endswith((".safetensors", ".pt", ".pth", ".bin"))
    if looks_like_path:
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise BackboneUnavailable(f"Local checkpoint '{path}' for model '{name}' does not exist.")
        return str(path), f"local checkpoint {path}"
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained not in tags:
        raise ValueError(
            f"open_clip has no pretrained tag '{pretrained}' for model '{name}'. Known tags: {tags or 'none'}; "
            f"or pass a local checkpoint path, '{SHIPPED_TAG}' for project models, or None."
        )
    return pretrained, f"open_clip tag '{pretrained}'"


def build_clip(name: str, pretrained: str | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """Create an open_clip CLIP model; fail fast with an actionable message when weights are unavailable."""
    if name not in open_clip.list_models():
        raise ValueError(f"Unknown model '{name}'. Project models: {PROJECT_MODELS}; or any of open_clip.list_models().")
    weights, description = _resolve_weights(name, pretrained)
    from safetensors import SafetensorError

    try:
        model = open_clip.create_model(name, pretrained=weights, device=device)
    except (RuntimeError, OSError, ValueError, KeyError, SafetensorError) as err:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise BackboneUnavailable(
            f"Could not load weights for '{name}' ({description}): {type(err).__name__}: {err}. "
            + ("HF_HUB_OFFLINE=1 is set, so nothing is downloaded. " if offline else "")
            + "With network access run once without HF_HUB_OFFLINE to fill the cache, or pass a local "
            "checkpoint path (pretrained='/path/to/open_clip_pytorch_model.bin')."
        ) from err
    return model


def save_clip_checkpoint(model: nn.Module, path: str | Path) -> str:
    """Save a whole CLIP state dict as safetensors (atomically) and return its sha256."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, path)
    return sha256_file(path)


class ImageClassifier(nn.Module):
    """A CLIP image encoder with a frozen zero-shot head: the model that is fine-tuned per task.

    Accepts uint8 images (the offline suite) or floats in [0, 1] (torchvision ``ToTensor``), resizes to the
    encoder's input size and applies CLIP normalisation here, so datasets stay backbone-agnostic.
    """

    def __init__(self, visual: nn.Module, head: torch.Tensor, logit_scale: float, image_size: int,
                 mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.visual = visual
        self.register_buffer("head", head.detach().clone())
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
        self.logit_scale = float(logit_scale)
        self.image_size = image_size

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return (x - self.mean) / self.std

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.visual(self.preprocess(images)), dim=-1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logit_scale * self.features(images) @ self.head.T


@dataclass
class Backbone:
    """A loaded CLIP model: the frozen pretrained weights theta_0 plus a cache of zero-shot heads."""

    name: str
    pretrained: str | None
    model: nn.Module
    tokenizer: object
    device: torch.device
    _heads: dict = field(default_factory=dict, repr=False)

    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    @property
    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        cfg = getattr(self.model.visual, "preprocess_cfg", {}) or {}
        return (tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
                tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD)))

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().exp().clamp(max=100).item())

    def encoder_state(self) -> dict[str, torch.Tensor]:
        """theta_0: a detached copy of the image encoder's parameters (the fine-tuned set)."""
        return {k: p.detach().clone() for k, p in self.model.visual.named_parameters()}

    @torch.no_grad()
    def head(self, classes: tuple[str, ...] | list[str], templates: tuple[str, ...] | list[str]) -> torch.Tensor:
        """Zero-shot head [C, D]: per class, embed every template, normalise, average, renormalise.

        Cached by (classes, templates) because every client and round reuses the same heads.
        """
        key = (tuple(classes), tuple(templates))
        if key not in self._heads:
            self.model.eval()
            rows = []
            for name in classes:
                tokens = self.tokenizer([t.format(name) for t in templates]).to(self.device)
                emb = F.normalize(self.model.encode_text(tokens), dim=-1).mean(0)
                rows.append(F.normalize(emb, dim=-1))
            self._heads[key] = torch.stack(rows)
        return self._heads[key]

    def classifier(self, head: torch.Tensor, encoder_state: dict[str, torch.Tensor] | None = None) -> ImageClassifier:
        """A fresh trainable copy of the image encoder (optionally with ``encoder_state``) and a frozen head."""
        visual = copy.deepcopy(self.model.visual)
        if encoder_state is not None:
            missing = set(dict(visual.named_parameters())) - set(encoder_state)
            if missing:
                raise KeyError(f"encoder_state lacks {len(missing)} parameters, e.g. {sorted(missing)[:3]}")
            visual.load_state_dict(encoder_state, strict=False)
        for p in visual.parameters():
            p.requires_grad_(True)
        mean, std = self.mean_std
        return ImageClassifier(visual, head, self.logit_scale, self.image_size, mean, std).to(self.device)


def load_backbone(name: str = "matu-tiny", pretrained: str | None = SHIPPED_TAG,
                  device: str | torch.device = "cpu") -> Backbone:
    """Load a CLIP backbone; the text tower and theta_0 are frozen (only copies are ever trained)."""
    device = torch.device(device)
    model = build_clip(name, pretrained, device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return Backbone(name, pretrained, model, open_clip.get_tokenizer(name), device)
