"""Compressors for what clients and the server send: quantised vectors, top-k sparsification, lossless coding.

Why: a MaTU client already sends one vector for all its tasks, but at float32 that vector is 32 bits per
parameter. Biased compressors (few-bit quantisation, signs, top-k) lose information every round; with error
feedback (the client adds what the last compression dropped to its next update) the loss does not accumulate.
These functions are the pure, tested pieces: each compressor turns a float32 vector into the exact bytes that
would travel and back, and ``nbytes`` is always ``len(to_bytes())``.

Quantisation (``quantize``): symmetric, per block of ``block`` entries with one float32 scale per block.

- ``bits=32``: the float32 values themselves (lossless).
- ``bits`` in 8, 4, 2: integer codes in [-L, L], L = 2**(bits-1) - 1, scale = max|x| / L, code = round(x / scale)
  (2 bits is ternary: -scale, 0, +scale). The error of every entry is at most scale / 2.
- ``bits=1``: the sign of each entry, scale = mean |x| over the block (the L2-optimal scale for a sign code, as in
  scaled sign compressors); an exact zero is sent as -scale.

Top-k (``topk``): the ``fraction`` largest-magnitude entries; positions travel as a bitmap coded with zstandard, so
a sparse bitmap costs close to its entropy, and values as float32 (or quantised by the caller).

Everything decoded from bytes is validated (lengths, bit widths, sizes) and a bad blob raises ``ValueError``
naming what is wrong; decompression is bounded by the size the header announces.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import torch
from torch import Tensor

BITS = (32, 8, 4, 2, 1)
DEFAULT_BLOCK = 4096
_MAGIC = b"MQ1"
_HEADER = struct.Struct("<3sBQI")  # magic, bits, length, block


def _check_vector(v: Tensor) -> None:
    if not isinstance(v, Tensor) or v.dim() != 1 or v.dtype != torch.float32 or v.numel() == 0:
        raise ValueError("expected a non-empty 1-D float32 tensor")
    if not bool(torch.isfinite(v).all()):
        raise ValueError("vector contains NaN/Inf: refusing to compress it")


def _check_bits(bits: int, block: int) -> None:
    if bits not in BITS:
        raise ValueError(f"unsupported bit width {bits!r}; expected one of {BITS}")
    if not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be a positive int, got {block!r}")


def levels(bits: int) -> int:
    """Largest code magnitude of a ``bits``-bit symmetric quantiser (0 for the sign code)."""
    return 0 if bits == 1 else 2 ** (bits - 1) - 1


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Unsigned codes < 2**bits (uint8) packed little-endian, 8 // bits per byte (bits in 1, 2, 4, 8)."""
    per = 8 // bits
    n = codes.numel()
    padded = torch.zeros(-(-n // per) * per, dtype=torch.int32)
    padded[:n] = codes
    shifts = torch.arange(per, dtype=torch.int32) * bits
    return (padded.view(-1, per) << shifts).sum(dim=1).to(torch.uint8)


def unpack_codes(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of ``pack_codes``: the first n codes as uint8."""
    per = 8 // bits
    if packed.numel() != -(-n // per):
        raise ValueError(f"{packed.numel()} code bytes cannot hold {n} codes of {bits} bits")
    shifts = torch.arange(per, dtype=torch.int32) * bits
    return ((packed.to(torch.int32).unsqueeze(1) >> shifts) & (2**bits - 1)).view(-1)[:n].to(torch.uint8)


@dataclass(frozen=True)
class Quantized:
    """A quantised vector: ``codes`` (packed bytes, or the float32 values for 32 bits) and one scale per block."""

    n: int
    bits: int
    block: int
    scales: Tensor  # float32, ceil(n / block) of them (none for 32 bits)
    codes: Tensor  # uint8

    def to_bytes(self) -> bytes:
        return (
            _HEADER.pack(_MAGIC, self.bits, self.n, self.block)
            + self.scales.numpy().tobytes()
            + self.codes.numpy().tobytes()
        )

    @property
    def nbytes(self) -> int:
        return _HEADER.size + 4 * self.scales.numel() + self.codes.numel()

    @classmethod
    def from_bytes(cls, data: bytes, max_length: int | None = None) -> Quantized:
        """Decode and validate (``max_length``: refuse vectors longer than the receiver expects)."""
        if len(data) < _HEADER.size:
            raise ValueError(f"quantised vector: {len(data)} bytes is shorter than its header")
        magic, bits, n, block = _HEADER.unpack_from(data)
        if magic != _MAGIC:
            raise ValueError("quantised vector: bad magic (not a quantised vector)")
        _check_bits(bits, block)
        if max_length is not None and n > max_length:
            raise ValueError(f"quantised vector: length {n} exceeds the expected {max_length}")
        n_scales = 0 if bits == 32 else -(-n // block)
        n_codes = 4 * n if bits == 32 else -(-n // (8 // bits))
        if len(data) != _HEADER.size + 4 * n_scales + n_codes:
            raise ValueError(
                f"quantised vector: {len(data)} bytes, expected {_HEADER.size + 4 * n_scales + n_codes} "
                f"for {n} entries at {bits} bits"
            )
        off = _HEADER.size
        scales = _from_buffer(data[off : off + 4 * n_scales], torch.float32)
        if not bool(torch.isfinite(scales).all()) or bool((scales < 0).any()):
            raise ValueError("quantised vector: scales must be finite and >= 0")
        codes = _from_buffer(data[off + 4 * n_scales :], torch.uint8)
        q = cls(n, bits, block, scales, codes)
        if bits == 32 and not bool(torch.isfinite(dequantize(q)).all()):
            raise ValueError("quantised vector: float32 values contain NaN/Inf")
        if bits in (8, 4, 2) and bool((unpack_codes(codes, bits, n) > 2 * levels(bits)).any()):
            raise ValueError(f"quantised vector: a code exceeds the {bits}-bit range")
        return q


def _from_buffer(data: bytes, dtype: torch.dtype) -> Tensor:
    """A tensor owning a copy of ``data`` (empty data gives an empty tensor)."""
    return torch.frombuffer(bytearray(data), dtype=dtype) if data else torch.zeros(0, dtype=dtype)


def _blocks(v: Tensor, block: int) -> Tensor:
    """v zero-padded to whole blocks, as (blocks, block)."""
    n = v.numel()
    padded = torch.zeros(-(-n // block) * block, dtype=torch.float32)
    padded[:n] = v
    return padded.view(-1, block)


def quantize(v: Tensor, bits: int, block: int = DEFAULT_BLOCK) -> Quantized:
    """``v`` at ``bits`` bits per entry plus one float32 scale per block (see the module docstring)."""
    _check_vector(v)
    _check_bits(bits, block)
    n = v.numel()
    if bits == 32:
        return Quantized(n, 32, block, torch.zeros(0), v.contiguous().view(torch.uint8).clone())
    blocks = _blocks(v, block)
    counts = torch.full((blocks.shape[0],), float(block))
    counts[-1] = n - block * (blocks.shape[0] - 1)
    if bits == 1:
        scales = blocks.abs().sum(dim=1) / counts
        codes = (v > 0).to(torch.uint8)
    else:
        top = levels(bits)
        scales = blocks.abs().amax(dim=1) / top
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))
        q = torch.round(blocks / safe[:, None]).clamp_(-top, top).view(-1)[:n]
        codes = (q + top).to(torch.uint8)
    return Quantized(n, bits, block, scales.float(), pack_codes(codes, bits))


def dequantize(q: Quantized) -> Tensor:
    """The float32 vector a receiver reconstructs from ``q``: exactly what the sender's error feedback assumes."""
    if q.bits == 32:
        return q.codes.view(torch.float32).clone()
    codes = unpack_codes(q.codes, q.bits, q.n)
    per_entry = q.scales.repeat_interleave(q.block)[: q.n]
    if q.bits == 1:
        return torch.where(codes.bool(), per_entry, -per_entry)
    return (codes.to(torch.float32) - levels(q.bits)) * per_entry


# ------------------------------------------------------------------------------------------ sparsity + coding


def zstd_compress(data: bytes, level: int = 10) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor(level=level, write_content_size=True).compress(data)


def zstd_decompress(data: bytes, expected_size: int) -> bytes:
    """Decompress untrusted bytes, refusing anything that does not expand to exactly ``expected_size`` bytes."""
    import zstandard

    try:
        out = zstandard.ZstdDecompressor().decompress(data, max_output_size=expected_size)
    except zstandard.ZstdError as err:
        raise ValueError(f"zstd data is corrupt: {err}") from None
    if len(out) != expected_size:
        raise ValueError(f"zstd data expands to {len(out)} bytes, expected {expected_size}")
    return out


def topk(v: Tensor, fraction: float) -> tuple[Tensor, Tensor]:
    """The ``fraction`` largest-magnitude entries of v: (bool mask of kept positions, their values in order).

    Linear time: the k-th largest magnitude is found with ``kthvalue``, every entry above it is kept, and ties at
    it are kept by position (first come) until k are kept, so the choice is deterministic on any platform.
    """
    _check_vector(v)
    if not 0 < fraction <= 1:
        raise ValueError(f"top-k fraction must be in (0, 1], got {fraction!r}")
    n = v.numel()
    k = max(1, round(fraction * n))
    mag = v.abs()
    threshold = torch.kthvalue(mag, n - k + 1).values
    keep = mag > threshold
    short = k - int(keep.sum())
    if short > 0:  # ties at the threshold, by position
        ties = torch.nonzero(mag == threshold).view(-1)[:short]
        keep[ties] = True
    return keep, v[keep]


def mask_bytes(mask: Tensor, coding: str = "zstd") -> bytes:
    """A bool mask as bytes: bit-packed ("packed"), or bit-packed then zstd-coded ("zstd")."""
    from .modulators import pack_mask

    packed = pack_mask(mask).numpy().tobytes()
    if coding == "packed":
        return packed
    if coding == "zstd":
        return zstd_compress(packed)
    raise ValueError(f"unknown mask coding {coding!r}; expected 'packed' or 'zstd'")


def mask_from_bytes(data: bytes, n: int, coding: str = "zstd") -> Tensor:
    from .modulators import mask_nbytes, unpack_mask

    raw = zstd_decompress(data, mask_nbytes(n)) if coding == "zstd" else data
    return unpack_mask(torch.frombuffer(bytearray(raw), dtype=torch.uint8), n)


def entropy_bits(mask: Tensor) -> float:
    """Bits of an ideal memoryless coder for the mask: n * H(density). A yardstick for the mask codings."""
    import math

    n = mask.numel()
    p = float(mask.sum()) / max(n, 1)
    if p in (0.0, 1.0):
        return 0.0
    return n * -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


# ------------------------------------------------------------------------------- a vector as it travels


_CODED = struct.Struct("<3sQQ")  # magic, length n, bytes of the zstd-coded support bitmap (0: dense)
_CODED_MAGIC = b"MC1"


@dataclass(frozen=True)
class Coded:
    """A float32 vector as it crosses the network: optionally sparse, its kept entries quantised.

    ``keep`` is the bool support (None: dense); on the wire it is a bit-packed bitmap coded with zstandard, so a
    sparse support costs close to its entropy. ``values`` holds the kept entries, in position order, quantised
    (``quantize``). ``decode()`` is the dense vector a receiver reconstructs, zero off the support: exactly what
    the sender's error feedback subtracts.
    """

    n: int
    keep: Tensor | None
    keep_blob: bytes
    values: Quantized

    @property
    def bits(self) -> int:
        return self.values.bits

    @property
    def support(self) -> int:
        return self.n if self.keep is None else self.values.n

    def decode(self) -> Tensor:
        vals = dequantize(self.values)
        if self.keep is None:
            return vals
        out = torch.zeros(self.n, dtype=torch.float32)
        out[self.keep] = vals
        return out

    def to_bytes(self) -> bytes:
        return _CODED.pack(_CODED_MAGIC, self.n, len(self.keep_blob)) + self.keep_blob + self.values.to_bytes()

    @property
    def nbytes(self) -> int:
        return _CODED.size + len(self.keep_blob) + self.values.nbytes

    @classmethod
    def from_bytes(cls, data: bytes, n: int) -> Coded:
        """Decode and validate a coded vector that must have ``n`` entries; ``ValueError`` says what is wrong."""
        if len(data) < _CODED.size:
            raise ValueError(f"coded vector: {len(data)} bytes is shorter than its header")
        magic, length, keep_bytes = _CODED.unpack_from(data)
        if magic != _CODED_MAGIC:
            raise ValueError("coded vector: bad magic (not a coded vector)")
        if length != n:
            raise ValueError(f"coded vector: length {length}, expected {n}")
        if keep_bytes > len(data) - _CODED.size:
            raise ValueError(
                f"coded vector: declares a {keep_bytes}-byte support, holds {len(data) - _CODED.size} bytes"
            )
        keep, blob = None, data[_CODED.size : _CODED.size + keep_bytes]
        if keep_bytes:
            keep = mask_from_bytes(blob, n, "zstd")
            if not bool(keep.any()):
                raise ValueError("coded vector: empty support")
        support = n if keep is None else int(keep.sum())
        values = Quantized.from_bytes(data[_CODED.size + keep_bytes :], max_length=support)
        if values.n != support:
            raise ValueError(f"coded vector: {values.n} values for a support of {support}")
        return cls(n, keep, blob, values)


def encode(v: Tensor, bits: int = 32, fraction: float = 1.0, block: int = DEFAULT_BLOCK) -> Coded:
    """``v`` as it travels: its top ``fraction`` entries by magnitude (all when 1.0), quantised to ``bits``."""
    _check_vector(v)
    _check_bits(bits, block)
    v = v.detach().cpu().to(torch.float32)
    if fraction >= 1:
        return Coded(v.numel(), None, b"", quantize(v, bits, block))
    keep, vals = topk(v, fraction)
    return Coded(v.numel(), keep, mask_bytes(keep, "zstd"), quantize(vals.contiguous(), bits, block))


def encode_with_feedback(
    update: Tensor, residual: Tensor | None, bits: int, fraction: float = 1.0, block: int = DEFAULT_BLOCK
) -> tuple[Coded, Tensor]:
    """Error feedback around ``encode``: send C(update + residual), keep what C dropped for the next round."""
    target = update if residual is None else update + residual
    coded = encode(target, bits, fraction, block)
    return coded, target - coded.decode()
