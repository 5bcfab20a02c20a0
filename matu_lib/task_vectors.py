"""Task vectors (Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023).

A task vector is tau_t = theta_t - theta_0 over the fine-tuned parameters (here: the CLIP image encoder).
It is a value type: arithmetic returns new vectors and never mutates operands. Flat views
(``flatten``/``unflatten``) connect it to the pure tensor operators in ``modulators`` and ``merging``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

StateDict = Mapping[str, torch.Tensor]


def _state_of(obj: nn.Module | StateDict) -> dict[str, torch.Tensor]:
    if isinstance(obj, nn.Module):
        return {k: p.detach() for k, p in obj.named_parameters()}
    return dict(obj)


def _check_compatible(a: StateDict, b: StateDict, what: str) -> None:
    if a.keys() != b.keys():
        only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        raise KeyError(f"{what}: parameter names differ (only left: {only_a[:3]}, only right: {only_b[:3]})")
    for k in a:
        if a[k].shape != b[k].shape:
            raise ValueError(f"{what}: shape mismatch for '{k}': {tuple(a[k].shape)} vs {tuple(b[k].shape)}")


class TaskVector:
    """tau = finetuned - pretrained, keyed by parameter name, floating point only."""

    def __init__(self, vector: StateDict):
        self.vector = {k: v.detach() for k, v in vector.items() if torch.is_floating_point(v)}

    @classmethod
    def from_weights(cls, pretrained: nn.Module | StateDict, finetuned: nn.Module | StateDict) -> TaskVector:
        base, tuned = _state_of(pretrained), _state_of(finetuned)
        base = {k: v for k, v in base.items() if torch.is_floating_point(v)}
        tuned = {k: v for k, v in tuned.items() if torch.is_floating_point(v)}
        _check_compatible(base, tuned, "TaskVector.from_weights")
        return cls({k: tuned[k].float() - base[k].float() for k in base})

    @classmethod
    def zeros_like(cls, reference: TaskVector | StateDict) -> TaskVector:
        ref = reference.vector if isinstance(reference, TaskVector) else reference
        return cls({k: torch.zeros_like(v, dtype=torch.float32) for k, v in ref.items()})

    # ---- algebra -------------------------------------------------------------------------------
    def _binary(self, other: TaskVector, op) -> TaskVector:
        if not isinstance(other, TaskVector):
            return NotImplemented
        _check_compatible(self.vector, other.vector, "TaskVector arithmetic")
        return TaskVector({k: op(v, other.vector[k]) for k, v in self.vector.items()})

    def __add__(self, other: TaskVector) -> TaskVector:
        return self._binary(other, torch.add)

    def __radd__(self, other) -> TaskVector:
        # lets the builtin sum() start from 0
        return self if other == 0 else self.__add__(other)

    def __sub__(self, other: TaskVector) -> TaskVector:
        return self._binary(other, torch.sub)

    def __neg__(self) -> TaskVector:
        return TaskVector({k: -v for k, v in self.vector.items()})

    def __mul__(self, scalar: float) -> TaskVector:
        if not isinstance(scalar, (int, float)):
            return NotImplemented
        return TaskVector({k: v * scalar for k, v in self.vector.items()})

    __rmul__ = __mul__

    @staticmethod
    def sum(vectors: Iterable[TaskVector]) -> TaskVector:
        vectors = list(vectors)
        if not vectors:
            raise ValueError("TaskVector.sum needs at least one vector")
        total = TaskVector.zeros_like(vectors[0])
        for v in vectors:
            total = total + v
        return total

    # ---- application ---------------------------------------------------------------------------
    def apply_to(self, pretrained: nn.Module | StateDict, coef: float = 1.0) -> dict[str, torch.Tensor] | nn.Module:
        """theta_0 + coef * tau. A module is updated in place and returned; a state dict gives a new dict."""
        base = _state_of(pretrained)
        floats = {k: v for k, v in base.items() if torch.is_floating_point(v)}
        _check_compatible(floats, self.vector, "apply_to")
        new = {**base, **{k: v + coef * self.vector[k].to(v.dtype) for k, v in floats.items()}}
        if isinstance(pretrained, nn.Module):
            with torch.no_grad():
                for k, p in pretrained.named_parameters():
                    p.copy_(new[k])
            return pretrained
        return new

    # ---- flat views ----------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self.vector)

    def numel(self) -> int:
        return sum(v.numel() for v in self.vector.values())

    def flatten(self) -> torch.Tensor:
        return torch.cat([v.reshape(-1).float() for v in self.vector.values()])

    def layout(self) -> list[tuple[str, tuple[int, ...]]]:
        """Names and shapes, in flatten order: what ``unflatten`` needs to rebuild a vector."""
        return [(k, tuple(v.shape)) for k, v in self.vector.items()]

    @classmethod
    def unflatten(cls, flat: torch.Tensor, layout: list[tuple[str, tuple[int, ...]]]) -> TaskVector:
        total = sum(math.prod(s) for _, s in layout)
        if flat.ndim != 1 or flat.numel() != total:
            raise ValueError(f"unflatten: expected a 1-D tensor of {total} values, got shape {tuple(flat.shape)}")
        out, offset = {}, 0
        for k, shape in layout:
            n = math.prod(shape)
            out[k] = flat[offset : offset + n].reshape(shape).clone()
            offset += n
        return cls(out)

    # ---- geometry ------------------------------------------------------------------------------
    def norm(self, p: float = 2) -> float:
        return float(torch.linalg.vector_norm(self.flatten(), ord=p))

    def dot(self, other: TaskVector) -> float:
        _check_compatible(self.vector, other.vector, "dot")
        return float(sum((a.double() * other.vector[k].double()).sum() for k, a in self.vector.items()))

    def cosine(self, other: TaskVector) -> float:
        denom = self.norm() * other.norm()
        return self.dot(other) / denom if denom > 0 else 0.0

    def sign_agreement(self, other: TaskVector) -> float:
        """Fraction of parameters where both vectors are non-zero and share a sign."""
        _check_compatible(self.vector, other.vector, "sign_agreement")
        same = sum(int((torch.sign(a) * torch.sign(other.vector[k]) > 0).sum()) for k, a in self.vector.items())
        return same / max(self.numel(), 1)

    # ---- persistence ---------------------------------------------------------------------------
    def save(self, path: str | Path, metadata: Mapping[str, str] | None = None) -> None:
        """Safetensors, written atomically (temp file + rename) so a crash never leaves half a file."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"kind": "matu_task_vector", "order": json.dumps(self.keys()), **(metadata or {})}
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: v.contiguous() for k, v in self.vector.items()}, str(tmp), metadata=meta)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> TaskVector:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("kind") != "matu_task_vector":
                    raise ValueError(f"{path} is not a task vector file (metadata kind={meta.get('kind')!r})")
                order = json.loads(meta["order"])
                return cls({k: f.get_tensor(k) for k in order})
        except (OSError, RuntimeError, SafetensorError) as err:
            raise ValueError(f"Could not read task vector {path}: {err}") from err

    def __repr__(self) -> str:
        return f"TaskVector({len(self.vector)} tensors, {self.numel():,} params, L2={self.norm():.4g})"
