"""What crosses the network, exactly how many bytes it takes, and a decoder that trusts none of it.

Every method's uploads and downloads are ``Payload`` objects. ``to_bytes`` is the wire format, and
``nbytes`` splits ``len(to_bytes())`` into vectors, masks, sketches, rescalers and metadata, so the byte
counts reported by the runner are the bytes actually serialised (a test checks the equality).

Wire format: 8-byte little-endian header length, a JSON header (client id, task ids, sample counts,
tensor names and lengths), then float32 vectors, coded vectors (``compression.Coded``: quantised, optionally
sparse; only when present), bit-packed masks (1 bit per parameter), bit-packed sign sketches (same packing as
masks; only when present) and float32 rescalers, in header order. A coded vector travels as its codes, and
``vectors[name]`` holds what a receiver decodes from them, so sender and receiver compute with the same numbers.
When the unified vector is sparse, each mask carries bits only where it is non-zero (a mask bit elsewhere
changes nothing: m * tau_u is 0 there), so ``masks`` lengths are then the support's size.

``Payload.from_bytes`` is the only way bytes from another machine become a ``Payload``. It checks the
header against a schema (types, finite numbers, unique ids, bounded sizes) and the declared sizes
against the blob's length *before* allocating anything, so any byte string gives either a valid
``Payload`` or one ``PayloadError`` whose message says what is wrong. Whether the payload makes sense for
this federation (its tasks, the sender, vector lengths) is the server's job (``server.validate_upload``).

MaTU's payload coding lives here too, because both ends need it: ``unify_payload`` (client upload, server
download) and ``payload_task_vector`` (the task vector a receiver reconstructs). So do the byte analyses of
a run's history (``mean_bytes_per_round``, ``bytes_to_target``, ``matu_upload_formula``,
``upload_formula_check``): every byte they read was counted by ``Payload.nbytes``.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .compression import DEFAULT_BLOCK, Coded, encode
from .modulators import pack_mask, reconstruct, unify, unpack_mask

# Bounds of the schema: far above anything an honest payload holds, low enough that nothing a hostile
# header declares can make the decoder allocate more than the blob it was given.
MAX_HEADER_BYTES = 1 << 20  # JSON header
MAX_ENTRIES = 4096  # tasks, vectors, masks, ... per payload
MAX_NAME_CHARS = 256  # a task id or vector name
MAX_SKETCH_BITS = 65536  # a sign sketch is a few hundred bits
MAX_CLIENT_ID = 2**31 - 1
MAX_VECTOR_LENGTH = 2**31 - 1  # entries of one coded vector (its bytes may be far fewer than its entries)
HEADER_KEYS = ("client", "tasks", "counts", "vectors", "masks", "rescalers")
OPTIONAL_HEADER_KEYS = ("sketches", "coded")
MASKED = "unified"  # the vector whose support sparse masks follow


class PayloadError(ValueError):
    """Bytes that are not a well-formed payload; the message says what is wrong (one line)."""


@dataclass
class Payload:
    client_id: int
    tasks: tuple[str, ...]
    vectors: dict[str, torch.Tensor] = field(default_factory=dict)  # dense float32 vectors by name
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # bool masks by task
    rescalers: dict[str, float] = field(default_factory=dict)  # scalar per task
    counts: dict[str, int] = field(default_factory=dict)  # training samples per task
    sketches: dict[str, torch.Tensor] = field(default_factory=dict)  # bool sign-sketch bits per task
    coded: dict[str, Coded] = field(default_factory=dict)  # vectors that travel coded, by name

    def __post_init__(self) -> None:
        if self.coded:  # what the sender computes with is what the receiver will decode
            for name, c in self.coded.items():
                self.vectors[name] = c.decode()
            keep = self._support()
            if keep is not None:
                self.masks = {t: m & keep for t, m in self.masks.items()}

    def _support(self) -> torch.Tensor | None:
        """The sparse unified vector's support (bool), or None when masks cover every parameter."""
        c = self.coded.get(MASKED)
        return None if c is None else c.keep

    def _mask_bits(self, mask: torch.Tensor) -> torch.Tensor:
        keep = self._support()
        return mask if keep is None else mask[keep]

    def _mask_length(self, mask: torch.Tensor) -> int:
        """Bits a mask travels as: the sparse unified vector's support size (counted once, when it was coded)."""
        c = self.coded.get(MASKED)
        return int(mask.numel()) if c is None or c.keep is None else c.support

    def _header(self) -> bytes:
        header = {
            "client": self.client_id,
            "tasks": list(self.tasks),
            "counts": self.counts,
            "vectors": {k: int(v.numel()) for k, v in self.vectors.items() if k not in self.coded},
            "masks": {k: self._mask_length(m) for k, m in self.masks.items()},
            "rescalers": list(self.rescalers),
        }
        if self.sketches:  # absent when empty, so payloads without sketches keep their byte counts
            header["sketches"] = {k: int(s.numel()) for k, s in self.sketches.items()}
        if self.coded:
            header["coded"] = {k: [c.n, c.nbytes] for k, c in self.coded.items()}
        return json.dumps(header, separators=(",", ":")).encode()

    def nbytes(self) -> dict[str, int]:
        """Bytes on the wire by component; ``total`` equals ``len(self.to_bytes())``."""
        parts = {
            "vectors": (
                sum(4 * v.numel() for k, v in self.vectors.items() if k not in self.coded)
                + sum(c.nbytes for c in self.coded.values())
            ),
            "masks": sum(math.ceil(self._mask_length(m) / 8) for m in self.masks.values()),
            "sketches": sum(math.ceil(s.numel() / 8) for s in self.sketches.values()),
            "rescalers": 4 * len(self.rescalers),
            "metadata": 8 + len(self._header()),
        }
        parts["total"] = sum(parts.values())
        return parts

    def to_bytes(self) -> bytes:
        header = self._header()
        chunks = [struct.pack("<Q", len(header)), header]
        chunks += [
            v.detach().to(torch.float32).cpu().numpy().tobytes() for k, v in self.vectors.items() if k not in self.coded
        ]
        chunks += [c.to_bytes() for c in self.coded.values()]
        chunks += [pack_mask(self._mask_bits(m).cpu()).numpy().tobytes() for m in self.masks.values()]
        chunks += [pack_mask(s.cpu()).numpy().tobytes() for s in self.sketches.values()]
        chunks.append(np.asarray(list(self.rescalers.values()), dtype="<f4").tobytes())
        return b"".join(chunks)

    @classmethod
    def from_bytes(cls, blob: bytes | bytearray | memoryview, max_length: int = MAX_VECTOR_LENGTH) -> Payload:
        """Decode untrusted bytes: a valid ``Payload`` or one ``PayloadError`` (never another exception).
        ``max_length`` bounds a coded vector's declared length (a receiver passes its encoder size)."""
        if not isinstance(blob, (bytes, bytearray, memoryview)):
            raise PayloadError(f"payload must be bytes, got {type(blob).__name__}")
        blob = bytes(blob)
        header, pos = _decode_header(blob, max_length)
        expected = (
            pos
            + sum(4 * n for n in header["vectors"].values())
            + sum(b for _, b in header["coded"].values())
            + sum(math.ceil(n / 8) for n in header["masks"].values())
            + sum(math.ceil(n / 8) for n in header["sketches"].values())
            + 4 * len(header["rescalers"])
        )
        if expected != len(blob):  # checked before any tensor is allocated
            what = "trailing bytes" if len(blob) > expected else "missing bytes (truncated)"
            raise PayloadError(
                f"payload has {abs(len(blob) - expected)} {what}: header declares {expected} bytes, "
                f"got {len(blob)}; corrupted or wrong format"
            )
        vectors, masks, sketches = {}, {}, {}
        for name, length in header["vectors"].items():
            vectors[name] = torch.from_numpy(np.frombuffer(blob, dtype="<f4", count=length, offset=pos).copy())
            pos += 4 * length
        coded = {}
        for name, (length, size) in header["coded"].items():
            try:
                coded[name] = Coded.from_bytes(blob[pos : pos + size], length)
            except ValueError as err:
                raise PayloadError(f"payload coded vector {name!r}: {err}") from None
            pos += size
        keep = coded[MASKED].keep if MASKED in coded else None
        support = None if keep is None else int(keep.sum())
        for kind, out in (("masks", masks), ("sketches", sketches)):
            for task, length in header[kind].items():
                if kind == "masks" and support is not None and length != support:
                    raise PayloadError(
                        f"payload mask of task {task!r} has {length} bits, but the sparse unified "
                        f"vector has {support} non-zero entries"
                    )
                size = math.ceil(length / 8)
                packed = torch.from_numpy(np.frombuffer(blob, dtype=np.uint8, count=size, offset=pos).copy())
                try:
                    out[task] = unpack_mask(packed, length)
                except ValueError as err:
                    raise PayloadError(f"payload {kind[:-1]} of task {task!r}: {err}") from None
                pos += size
        scales = np.frombuffer(blob, dtype="<f4", count=len(header["rescalers"]), offset=pos)
        rescalers = {t: float(s) for t, s in zip(header["rescalers"], scales)}
        bad = [t for t, s in rescalers.items() if not math.isfinite(s)]
        if bad:
            raise PayloadError(f"payload rescalers are not finite for tasks {bad}")
        if keep is not None:  # masks arrived over the support: spread them back to every parameter
            for task, bits in masks.items():
                dense = torch.zeros(keep.numel(), dtype=torch.bool)
                dense[keep] = bits
                masks[task] = dense
        return cls(
            header["client"], tuple(header["tasks"]), vectors, masks, rescalers, header["counts"], sketches, coded
        )


# ------------------------------------------------------------------------------------------- schema


def _no_constants(name: str):
    raise PayloadError(f"payload header holds {name}, which is not a finite number")


def _unique_pairs(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        dup = sorted({k for k in keys if keys.count(k) > 1})
        raise PayloadError(f"payload header repeats keys {dup[:5]}")
    return dict(pairs)


def _name(value: object, what: str) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_NAME_CHARS:
        raise PayloadError(
            f"payload header: {what} must be a string of 1-{MAX_NAME_CHARS} characters, got {_short(value)}"
        )
    return value


def _int(value: object, what: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise PayloadError(f"payload header: {what} must be an integer in [{lo}, {hi}], got {_short(value)}")
    return value


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _sized(header: dict, key: str, max_length: int, tasks: set[str] | None) -> dict[str, int]:
    """``{name: length}`` with string names (task ids when ``tasks`` is given) and bounded integer lengths."""
    value = header.get(key, {})
    if not isinstance(value, dict) or len(value) > MAX_ENTRIES:
        raise PayloadError(
            f"payload header: '{key}' must be an object of at most {MAX_ENTRIES} entries, got {type(value).__name__}"
        )
    for name, length in value.items():
        _name(name, f"a name in '{key}'")
        if tasks is not None and name not in tasks:
            raise PayloadError(f"payload header: '{key}' names task {name!r}, which is not in the payload's tasks")
        _int(length, f"the length of {key}[{name!r}]", 0 if tasks is None else 1, max_length)
    return value


def _coded_header(header: dict, max_length: int, room: int) -> dict[str, tuple[int, int]]:
    """``{name: (entries, bytes)}`` of the coded vectors: bounded ints, names distinct from float32 vectors."""
    value = header.get("coded", {})
    if not isinstance(value, dict) or len(value) > MAX_ENTRIES:
        raise PayloadError(f"payload header: 'coded' must be an object of at most {MAX_ENTRIES} entries")
    out = {}
    for name, pair in value.items():
        _name(name, "a name in 'coded'")
        if name in header["vectors"]:
            raise PayloadError(f"payload header: vector {name!r} is both float32 and coded")
        if not isinstance(pair, list) or len(pair) != 2:
            raise PayloadError(f"payload header: coded[{name!r}] must be [entries, bytes], got {_short(pair)}")
        out[name] = (
            _int(pair[0], f"the length of coded[{name!r}]", 1, max_length),
            _int(pair[1], f"the bytes of coded[{name!r}]", 1, room),
        )
    return out


def _decode_header(blob: bytes, max_length: int = MAX_VECTOR_LENGTH) -> tuple[dict, int]:
    """The header checked against the schema, and the offset where the tensor data starts."""
    if len(blob) < 8:
        raise PayloadError(f"payload has {len(blob)} bytes, fewer than the 8-byte header length")
    (n,) = struct.unpack_from("<Q", blob, 0)
    if n > min(MAX_HEADER_BYTES, len(blob) - 8):
        raise PayloadError(
            f"payload declares a {n}-byte header, but holds {len(blob) - 8} bytes after the length "
            f"(limit {MAX_HEADER_BYTES}); truncated or not a payload"
        )
    try:
        header = json.loads(
            blob[8 : 8 + n].decode("utf-8"), parse_constant=_no_constants, object_pairs_hook=_unique_pairs
        )
    except PayloadError:
        raise
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PayloadError(f"payload header is not valid JSON: {err}") from None
    except RecursionError:
        raise PayloadError("payload header is nested too deeply") from None
    if not isinstance(header, dict):
        raise PayloadError(f"payload header must be a JSON object, got {type(header).__name__}")
    missing = [k for k in HEADER_KEYS if k not in header]
    unknown = sorted(set(header) - set(HEADER_KEYS) - set(OPTIONAL_HEADER_KEYS))
    if missing or unknown:
        raise PayloadError(f"payload header: missing keys {missing}, unknown keys {unknown[:5]}")
    _int(header["client"], "'client'", -MAX_CLIENT_ID - 1, MAX_CLIENT_ID)
    tasks = header["tasks"]
    if not isinstance(tasks, list) or len(tasks) > MAX_ENTRIES:
        raise PayloadError(f"payload header: 'tasks' must be a list of at most {MAX_ENTRIES} task ids")
    for t in tasks:
        _name(t, "a task id")
    if len(set(tasks)) != len(tasks):
        raise PayloadError(f"payload header: duplicate task ids {sorted({t for t in tasks if tasks.count(t) > 1})[:5]}")
    held = set(tasks)
    counts = header["counts"]
    if not isinstance(counts, dict):
        raise PayloadError(f"payload header: 'counts' must be an object, got {type(counts).__name__}")
    for t, c in counts.items():
        if t not in held:
            raise PayloadError(
                f"payload header: a sample count for task {_short(t)}, which is not in the payload's tasks"
            )
        _int(c, f"the sample count of task {t!r}", 0, 2**53)
    # lengths bounded by the blob itself: a declared length can never exceed what the bytes could hold
    room = len(blob) * 8
    header["vectors"] = _sized(header, "vectors", room, None)
    header["masks"] = _sized(header, "masks", room, held)
    header["sketches"] = _sized(header, "sketches", MAX_SKETCH_BITS, held)
    header["coded"] = _coded_header(header, max_length, len(blob))
    rescalers = header["rescalers"]
    if not isinstance(rescalers, list) or len(rescalers) > MAX_ENTRIES:
        raise PayloadError("payload header: 'rescalers' must be a list of task ids")
    for t in rescalers:
        if _name(t, "a rescaler's task id") not in held:
            raise PayloadError(f"payload header: a rescaler for task {t!r}, which is not in the payload's tasks")
    if len(set(rescalers)) != len(rescalers):
        raise PayloadError("payload header: duplicate rescaler task ids")
    return header, 8 + n


def add_bytes(total: dict[str, int], payload: Payload) -> None:
    for key, value in payload.nbytes().items():
        total[key] = total.get(key, 0) + value


# ------------------------------------------------------------------------------------ MaTU's coding


def compresses(bits: int, fraction: float) -> bool:
    """Whether a (bits, top-k fraction) setting changes what travels (32 bits, everything kept: it does not)."""
    return bits != 32 or fraction < 1


def code_vectors(
    vectors: Mapping[str, torch.Tensor], bits: int = 32, fraction: float = 1.0, block: int = DEFAULT_BLOCK
) -> dict[str, Coded]:
    """Each vector coded for the wire (``compression.encode``); {} when the setting sends float32 as it is, so
    uncompressed payloads keep their exact bytes."""
    if not compresses(bits, fraction):
        return {}
    return {name: encode(v, bits, fraction, block) for name, v in vectors.items()}


def unify_payload(
    client_id: int,
    tasks: Sequence[str],
    vectors: Sequence[torch.Tensor],
    counts: dict[str, int],
    rule: str,
    tie: str,
    use_masks: bool,
    use_rescalers: bool,
    magnitude: str,
    device: str | torch.device | None = None,
    bits: int = 32,
    fraction: float = 1.0,
    block: int = DEFAULT_BLOCK,
) -> Payload:
    """EMR-unify ``vectors`` (one per task) into one vector plus per-task masks and rescalers.

    Clients build their uploads with it and the server its downloads, so it sits with the wire format rather
    than with either end. Every MaTU option is explicit (``RunConfig`` holds their defaults). Without masks
    nothing per-task is sent (all-ones masks are implied), so the ablation's bytes are honest. With ``bits`` <
    32 or ``fraction`` < 1 the unified vector travels coded (``code_vectors``) and the payload holds its decoded
    form, so whoever reconstructs from it (the sender's error feedback included) uses the received numbers.
    """
    unified, masks, scales = unify(
        list(vectors),
        rule=rule,
        tie=tie,
        use_masks=use_masks,
        use_rescalers=use_rescalers,
        magnitude=magnitude,
        device=device,
    )
    return Payload(
        client_id,
        tuple(tasks),
        {"unified": unified},
        {t: m for t, m in zip(tasks, masks)} if use_masks else {},
        {t: s for t, s in zip(tasks, scales)} if use_rescalers else {},
        dict(counts),
        coded=code_vectors({"unified": unified}, bits, fraction, block),
    )


def payload_task_vector(payload: Payload, task: str) -> torch.Tensor:
    """Reconstruct task ``task`` from a unified payload (absent masks/rescalers mean all-ones / 1.0)."""
    unified = payload.vectors["unified"]
    mask = payload.masks.get(task)
    if mask is None:
        mask = torch.ones(unified.numel(), dtype=torch.bool)
    return reconstruct(unified, mask, payload.rescalers.get(task, 1.0))


# ------------------------------------------------------------------------- bytes of a run's history


def mean_bytes_per_round(history: list[dict], direction: str = "up") -> dict[str, float]:
    """Bytes per round by component (vectors, masks, rescalers, metadata, total), averaged over rounds."""
    if direction not in ("up", "down"):
        raise ValueError(f"direction must be 'up' or 'down', got {direction!r}")
    parts: dict[str, float] = {}
    for h in history:
        for k, v in h[f"bytes_{direction}"].items():
            parts[k] = parts.get(k, 0.0) + v / len(history)
    return parts


def bytes_to_target(histories: dict[str, list[dict]], target: float) -> dict[str, float | None]:
    """Cumulative upload bytes when a method's mean accuracy first reaches ``target`` (None: never)."""
    reached = {}
    for method, history in histories.items():
        hits = [h["cum_bytes_up"] for h in history if h.get("mean_acc", -1.0) >= target]
        reached[method] = float(hits[0]) if hits else None
    return reached


def upload_formula(n_params: int, tasks_per_client: Iterable[int], sketch_bits: int = 0) -> int:
    """MaTU's upload in one round without metadata: sum_k 4P + |T_k| (ceil(P/8) + 4 + ceil(B/8)) over the
    sampled clients: the unified vector, and per task a mask, a rescaler and an update sketch of B bits."""
    sketch = math.ceil(sketch_bits / 8)
    return sum(4 * n_params + n * (math.ceil(n_params / 8) + 4 + sketch) for n in tasks_per_client)


def matu_upload_formula(ctx, sampled: Iterable[int]) -> int:
    """``upload_formula`` for the clients ``sampled`` in a round of ``ctx`` (a ``methods.FedContext``)."""
    return upload_formula(ctx.trainer.n_params, [len(ctx.clients[k].tasks) for k in sampled], ctx.cfg.sketch_bits)


def upload_formula_check(
    history: list[dict],
    n_params: int,
    tasks_of: Mapping[int, Sequence[str]],
    sketch_bits: int,
    metadata_per_client: int = 1000,
) -> dict:
    """MaTU's measured upload bytes against ``upload_formula``, round by round, computed rather than asserted.

    ``ok`` is True only when, in every round, measured minus metadata equals the formula exactly and the
    metadata stays under ``metadata_per_client`` bytes per sampled client (the JSON header is small). The
    formula assumes masks and rescalers are sent (``use_masks`` and ``use_rescalers`` on).
    """
    rounds = []
    for h in history:
        measured, metadata = h["bytes_up"]["total"], h["bytes_up"]["metadata"]
        formula = upload_formula(n_params, [len(tasks_of[k]) for k in h["sampled"]], sketch_bits)
        rounds.append(
            {
                "round": h["round"],
                "measured": measured,
                "metadata": metadata,
                "formula": formula,
                "clients": len(h["sampled"]),
                "ok": measured - metadata == formula and metadata < metadata_per_client * len(h["sampled"]),
            }
        )
    return {"ok": bool(rounds) and all(r["ok"] for r in rounds), "rounds": rounds}
