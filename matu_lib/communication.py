"""What crosses the network, and exactly how many bytes it takes.

Every method's uploads and downloads are ``Payload`` objects. ``to_bytes`` is the wire format, and
``nbytes`` splits ``len(to_bytes())`` into vectors, masks, rescalers and metadata, so the byte counts
reported by the runner are the bytes actually serialised (a test checks the equality).

Wire format: 8-byte little-endian header length, a JSON header (client id, task ids, sample counts,
tensor names and lengths), then float32 vectors, bit-packed masks (1 bit per parameter), bit-packed
sign sketches (MaTU's per-task update sketches, when sent) and float32 rescalers, in header order.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field

import numpy as np
import torch

from .modulators import pack_mask, unpack_mask


@dataclass
class Payload:
    client_id: int
    tasks: tuple[str, ...]
    vectors: dict[str, torch.Tensor] = field(default_factory=dict)   # dense float32 vectors by name
    masks: dict[str, torch.Tensor] = field(default_factory=dict)     # bool masks by task
    rescalers: dict[str, float] = field(default_factory=dict)        # scalar per task
    counts: dict[str, int] = field(default_factory=dict)             # training samples per task
    sketches: dict[str, torch.Tensor] = field(default_factory=dict)  # bool sign sketch of each task's update

    def _header(self) -> bytes:
        header = {
            "client": self.client_id,
            "tasks": list(self.tasks),
            "counts": self.counts,
            "vectors": {k: int(v.numel()) for k, v in self.vectors.items()},
            "masks": {k: int(m.numel()) for k, m in self.masks.items()},
            "rescalers": list(self.rescalers),
        }
        if self.sketches:
            header["sketches"] = {k: int(b.numel()) for k, b in self.sketches.items()}
        return json.dumps(header, separators=(",", ":")).encode()

    def nbytes(self) -> dict[str, int]:
        """Bytes on the wire by component; ``total`` equals ``len(self.to_bytes())``."""
        parts = {
            "vectors": sum(4 * v.numel() for v in self.vectors.values()),
            "masks": sum(math.ceil(m.numel() / 8) for m in self.masks.values()),
            "rescalers": 4 * len(self.rescalers),
            "sketches": sum(math.ceil(b.numel() / 8) for b in self.sketches.values()),
            "metadata": 8 + len(self._header()),
        }
        parts["total"] = sum(parts.values())
        return parts

    def to_bytes(self) -> bytes:
        header = self._header()
        chunks = [struct.pack("<Q", len(header)), header]
        chunks += [v.detach().to(torch.float32).cpu().numpy().tobytes() for v in self.vectors.values()]
        chunks += [pack_mask(m.cpu()).numpy().tobytes() for m in self.masks.values()]
        chunks += [pack_mask(b.cpu()).numpy().tobytes() for b in self.sketches.values()]
        chunks.append(np.asarray(list(self.rescalers.values()), dtype="<f4").tobytes())
        return b"".join(chunks)

    @classmethod
    def from_bytes(cls, blob: bytes) -> "Payload":
        (n,) = struct.unpack_from("<Q", blob, 0)
        header = json.loads(blob[8:8 + n])
        pos = 8 + n
        vectors = {}
        for name, length in header["vectors"].items():
            vectors[name] = torch.from_numpy(np.frombuffer(blob, dtype="<f4", count=length, offset=pos).copy())
            pos += 4 * length
        bits: dict[str, dict[str, torch.Tensor]] = {"masks": {}, "sketches": {}}
        for part in bits:
            for name, length in header.get(part, {}).items():
                size = math.ceil(length / 8)
                packed = torch.from_numpy(np.frombuffer(blob, dtype=np.uint8, count=size, offset=pos).copy())
                bits[part][name] = unpack_mask(packed, length)
                pos += size
        masks = bits["masks"]
        scales = np.frombuffer(blob, dtype="<f4", count=len(header["rescalers"]), offset=pos)
        pos += 4 * len(header["rescalers"])
        if pos != len(blob):
            raise ValueError(f"payload has {len(blob) - pos} trailing bytes: corrupted or wrong format")
        return cls(header["client"], tuple(header["tasks"]), vectors, masks,
                   {k: float(s) for k, s in zip(header["rescalers"], scales)}, header["counts"], bits["sketches"])


def add_bytes(total: dict[str, int], payload: Payload) -> None:
    for key, value in payload.nbytes().items():
        total[key] = total.get(key, 0) + value
