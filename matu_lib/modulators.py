"""Modulators: EMR-Merging's Elect, Mask and Rescale operators, used as MaTU's modulators.

MaTU (Tsouvalas et al., arXiv 2502.06376) augments one *unified* task vector with lightweight
per-task *modulators* -- a binary mask and a scalar rescaler per task. The paper's body is not
available; this follows its abstract and EMR-Merging (Huang et al., "EMR-Merging: Tuning-Free
High-Performance Model Merging", NeurIPS 2024), whose operators are, for flat task vectors
tau_1..tau_n:

- elect sign       sigma_j = sgn(sum_i tau_ij)                     (rule="sum"; see ``ElectRule``)
- elect magnitude  mu_j    = max{|tau_ij| : tau_ij * sigma_j > 0}  (0 if no task agrees; see ``Magnitude``)
- unified vector   tau_u   = sigma * mu
- task mask        m_i     = 1[tau_i * sigma > 0]
- rescaler         lambda_i = sum_j |tau_ij| / sum_j |m_ij * tau_uj|
- reconstruction   lambda_i * (m_i * tau_u), which keeps the L1 norm of tau_i.

Decisions made here (every one is an argument or documented below):

- Tie rule (``TieRule``): an exact zero of the election statistic elects -1 by default
  (``tie="negative"``), as EMR-Merging's code does (``sign(0)`` is mapped to -1). ``"positive"``
  elects +1; ``"zero"`` elects 0, which drops the entry from every mask. Because a tie with
  ``"negative"``/``"positive"`` only matters where some task agrees with the chosen sign, all three
  rules give the same unified vector on all-zero columns (mu = 0 there).
- Magnitude (``Magnitude``): EMR elects the *largest* agreeing magnitude (``"max"``, default); ``"mean"``
  takes the mean over the agreeing tasks (TIES' disjoint mean). With a rescaler per task either works;
  ``"mean"`` tracks each task's own magnitudes more closely when several tasks agree (reconstructed vs
  original cosine 0.79 vs 0.77 for 4 tasks of the cpu preset).
- Rescaler 0/0: when the mask selects nothing (the task is all zeros, or disagrees with the
  elected sign everywhere), the reconstruction is 0 whatever the rescaler, so ``rescaler`` returns
  1.0 (finite and neutral) instead of NaN/Inf. Only in that case is the L1 norm not restored.
- Sums are accumulated in float32 (the inputs' dtype; float32 for 16-bit inputs), as EMR's code
  does: on CPU a float64 accumulator costs ~15x more time, and the election only differs where the
  sum is within rounding of 0, i.e. a genuine tie. Within a slice the order of tasks can change the
  elected sign only there; results are exact (and order-free) for integer-valued inputs.
  Rescalers sum per-slice float32 partial sums in Python floats (relative error ~1e-6).

Memory: a client of ViT-B/32 size holds 30 x 88M parameters; a dense (tasks x params) stack would
double that. Every operator therefore walks the vectors in slices of ``chunk_size`` entries and
only ever materialises O(n_tasks x chunk_size) temporaries plus its outputs. Masks can be returned
bit-packed (1 bit per parameter, see ``pack_mask``), which is also their upload format.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

ElectRule = Literal["sum", "majority"]
"""How sigma is elected: "sum" = sign of the sum of values (EMR/TIES "mass"); "majority" = sign of
(#positive - #negative) entries, i.e. one vote per task regardless of magnitude."""

TieRule = Literal["negative", "positive", "zero"]
"""What an exact zero of the election statistic elects: -1 (EMR code), +1, or 0 (entry dropped)."""

Magnitude = Literal["max", "mean"]
"""How mu is elected from the agreeing tasks: their largest |tau| (EMR) or their mean |tau| (TIES)."""

DEFAULT_CHUNK_SIZE = 2**22  # 4M entries: 16 MiB per float32 slice, large enough to amortise overhead

BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)  # little-endian bits


# ----------------------------------------------------------------------------- input validation


def _check_chunk_size(chunk_size: int) -> None:
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


def _check_magnitude(magnitude: str) -> None:
    if magnitude not in get_args(Magnitude):
        raise ValueError(f"unknown magnitude {magnitude!r}; expected one of {get_args(Magnitude)}")


def _check_rules(rule: str, tie: str, magnitude: str = "max") -> None:
    _check_magnitude(magnitude)
    if rule not in get_args(ElectRule):
        raise ValueError(f"unknown election rule {rule!r}; expected one of {get_args(ElectRule)}")
    if tie not in get_args(TieRule):
        raise ValueError(f"unknown tie rule {tie!r}; expected one of {get_args(TieRule)}")


def _check_vector(vector: Tensor, name: str = "vector") -> None:
    if not isinstance(vector, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(vector).__name__}")
    if vector.dim() != 1:
        raise ValueError(f"{name} must be 1-D (a flattened task vector), got shape {tuple(vector.shape)}")
    if not vector.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {vector.dtype}")


def check_vectors(vectors: Sequence[Tensor]) -> tuple[int, torch.dtype]:
    """Validate a list of flat task vectors (structure only) and return (length, dtype).

    Finiteness is checked while the operators stream over the data (see ``_raise_if_not_finite``),
    so validation never costs an extra pass over 10 GB of inputs.
    """
    if isinstance(vectors, Tensor):
        raise ValueError("pass task vectors as a sequence of 1-D tensors, not one stacked tensor")
    if len(vectors) == 0:
        raise ValueError("need at least one task vector, got an empty list")
    for i, v in enumerate(vectors):
        _check_vector(v, f"task vector {i}")
    n, dtype = vectors[0].numel(), vectors[0].dtype
    if n == 0:
        raise ValueError("task vectors are empty (length 0)")
    for i, v in enumerate(vectors):
        if v.numel() != n:
            raise ValueError(f"task vectors have mismatched lengths: vector 0 has {n}, vector {i} has {v.numel()}")
        if v.dtype != dtype:
            raise ValueError(f"task vectors have mismatched dtypes: vector 0 is {dtype}, vector {i} is {v.dtype}")
        if v.device != vectors[0].device:
            raise ValueError(f"task vectors are on different devices: {vectors[0].device} and {v.device} (vector {i})")
    return n, dtype


def spans(n: int, chunk_size: int) -> Iterator[tuple[int, int]]:
    """(start, stop) slices covering range(n) in order; the unit of work of every streaming operator."""
    _check_chunk_size(chunk_size)
    for start in range(0, n, chunk_size):
        yield start, min(start + chunk_size, n)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulator dtype for sums: float32 for 16-bit inputs, else the inputs' own dtype."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def raise_if_not_finite(chunks: Sequence[Tensor], total: Tensor, start: int) -> None:
    """Raise ValueError naming the offending task vector if ``total`` (the sum of ``chunks``) is not
    finite.

    A finite sum proves every summand finite (Inf or NaN propagate), so the check costs one pass over
    one slice; the per-vector search runs only on the error path. A sum can also overflow from
    finite values (|x| ~ 1e38 in float32, never seen in task vectors); that is reported as such.
    """
    if bool(torch.isfinite(total).all()):
        return
    for i, c in enumerate(chunks):
        bad = (~torch.isfinite(c)).nonzero()
        if bad.numel():
            raise ValueError(f"task vector {i} contains NaN/Inf (first at index {start + int(bad[0])})")
    raise ValueError(f"the sum of the task vectors overflows near index {start}")


# ----------------------------------------------------------------------------- elect


def _elect_sign_chunk(chunks: Sequence[Tensor], rule: str, tie: str, start: int) -> Tensor:
    """Elected sign (int8) of one slice; also checks the slice for NaN/Inf."""
    total = torch.zeros(chunks[0].numel(), dtype=acc_dtype(chunks[0].dtype), device=chunks[0].device)
    for c in chunks:
        total += c
    raise_if_not_finite(chunks, total, start)
    if rule == "majority":
        total.zero_()
        for c in chunks:
            total += torch.sign(c)  # vote counts are exact in float32 up to 2**24 tasks
    sign = torch.sign(total).to(torch.int8)
    if tie != "zero":
        sign[sign == 0] = -1 if tie == "negative" else 1
    return sign


def elect_sign(
    vectors: Sequence[Tensor],
    rule: ElectRule = "sum",
    tie: TieRule = "negative",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """Elect one sign per parameter: sgn(sum_i tau_i) ("sum") or sgn(#pos - #neg) ("majority").

    Returns an int8 vector with values in {-1, +1} ({-1, 0, +1} with ``tie="zero"``). The "sum" rule
    lets large updates outvote many small ones (EMR, TIES); "majority" gives each task one vote.
    """
    n, _ = check_vectors(vectors)
    _check_rules(rule, tie)
    out = torch.empty(n, dtype=torch.int8, device=vectors[0].device)
    for a, b in spans(n, chunk_size):
        out[a:b] = _elect_sign_chunk([v[a:b] for v in vectors], rule, tie, a)
    return out


def _check_sign(sign: Tensor, n: int) -> None:
    if not isinstance(sign, Tensor) or sign.dim() != 1 or sign.numel() != n:
        raise ValueError(f"sign must be a 1-D tensor of length {n} (the task-vector length)")
    if sign.is_floating_point() and not bool(torch.isfinite(sign).all()):
        raise ValueError("sign contains NaN/Inf")


def _magnitude_chunk(chunks: Sequence[Tensor], s: Tensor, magnitude: str) -> Tensor:
    """mu over one slice. c*s equals |c| where c agrees with s and is <= 0 elsewhere, so clamping at 0
    (or a max with 0) selects the agreeing tasks."""
    mu = torch.zeros_like(s)
    if magnitude == "max":
        for c in chunks:
            torch.maximum(mu, c * s, out=mu)
        return mu
    count = torch.zeros_like(s)
    for c in chunks:
        p = c * s
        mu.add_(p.clamp_(min=0))
        count.add_(p > 0)
    return mu.div_(count.clamp_(min=1))  # a single agreeing task divides by exactly 1: its |c| unchanged


def elect_magnitude(
    vectors: Sequence[Tensor], sign: Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE, magnitude: Magnitude = "max"
) -> Tensor:
    """mu_j = max (or mean) over tasks agreeing with sign_j of |tau_ij|, 0 where no task agrees.

    EMR takes the max, keeping the largest agreeing update so that every task's rescaler can later
    scale it *down*; ``"mean"`` follows each task's own magnitudes more closely. ``sign`` is any tensor
    whose sign is used (e.g. the int8 output of ``elect_sign``). Returns a vector of the inputs' dtype.
    """
    n, dtype = check_vectors(vectors)
    _check_sign(sign, n)
    _check_magnitude(magnitude)
    out = torch.empty(n, dtype=dtype, device=vectors[0].device)
    for a, b in spans(n, chunk_size):
        chunks = [v[a:b] for v in vectors]
        for i, c in enumerate(chunks):
            if not bool(torch.isfinite(c).all()):
                raise ValueError(f"task vector {i} contains NaN/Inf (in slice starting at {a})")
        out[a:b] = _magnitude_chunk(chunks, torch.sign(sign[a:b]).to(dtype), magnitude)
    return out


def unified_vector(
    vectors: Sequence[Tensor],
    rule: ElectRule = "sum",
    tie: TieRule = "negative",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    magnitude: Magnitude = "max",
) -> Tensor:
    """tau_u = sigma * mu: the single vector that MaTU shares for all of a client's tasks."""
    n, dtype = check_vectors(vectors)
    _check_rules(rule, tie, magnitude)
    out = torch.empty(n, dtype=dtype, device=vectors[0].device)
    for a, b in spans(n, chunk_size):
        chunks = [v[a:b] for v in vectors]
        s = _elect_sign_chunk(chunks, rule, tie, a).to(dtype)
        out[a:b] = s * _magnitude_chunk(chunks, s, magnitude)
    return out


# ----------------------------------------------------------------------------- mask and rescale


def task_mask(vector: Tensor, unified: Tensor) -> Tensor:
    """m_i = 1[tau_i * sign(tau_u) > 0], with the sign taken from the *unified vector* tau_u.

    This equals EMR's 1[tau_i * sigma > 0] with the elected sigma: where mu_j > 0, sign(tau_uj) =
    sigma_j; where mu_j = 0 no task agrees with sigma_j, so both masks are 0. Using tau_u means the
    mask can be recomputed from what is communicated, without the election statistic.
    """
    _check_vector(vector, "vector")
    _check_vector(unified, "unified")
    if vector.numel() != unified.numel():
        raise ValueError(f"vector has length {vector.numel()} but unified has length {unified.numel()}")
    return (vector * torch.sign(unified)) > 0


def as_bool_mask(mask: Tensor, n: int) -> Tensor:
    """Accept a bool mask of length n or a packed uint8 mask (always read as packed)."""
    if not isinstance(mask, Tensor) or mask.dim() != 1:
        raise ValueError("mask must be a 1-D tensor (bool, or uint8 from pack_mask)")
    if mask.dtype == torch.uint8:
        return unpack_mask(mask, n)
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool or packed uint8, got dtype {mask.dtype}")
    if mask.numel() != n:
        raise ValueError(f"mask has length {mask.numel()} but the vector has length {n}")
    return mask


def rescaler_ratio(numerator: float, denominator: float) -> float:
    """A task's rescaler from its numerator and denominator sums."""
    # 0/0 (and x/0) only happen when the mask selects nothing; the reconstruction is then 0 for any
    # rescaler, so return the neutral 1.0 rather than NaN/Inf (module docstring, "Rescaler 0/0").
    return numerator / denominator if denominator > 0 else 1.0


def rescaler(vector: Tensor, mask: Tensor, unified: Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE) -> float:
    """lambda_i = sum|tau_i| / sum|m_i * tau_u|, so that the reconstruction keeps tau_i's L1 norm.

    Returns 1.0 when the denominator is 0 (the mask selects nothing; see module docstring).
    """
    _check_vector(vector, "vector")
    _check_vector(unified, "unified")
    n = vector.numel()
    if unified.numel() != n:
        raise ValueError(f"vector has length {n} but unified has length {unified.numel()}")
    mask = as_bool_mask(mask, n)
    acc = acc_dtype(vector.dtype)
    num = den = 0.0
    for a, b in spans(n, chunk_size):
        num += float(vector[a:b].abs().sum(dtype=acc))
        den += float(torch.where(mask[a:b], unified[a:b], 0).abs().sum(dtype=acc))
    if not (math.isfinite(num) and math.isfinite(den)):
        raise ValueError("vector or unified contains NaN/Inf")
    return rescaler_ratio(num, den)


def tensor_rescalers(vector: Tensor, mask: Tensor, unified: Tensor, sizes: Sequence[int]) -> Tensor:
    """One L1 rescaler per parameter tensor (``sizes``: entries of each, in the flat vector's order).

    The richer alternative to EMR's single rescaler: each tensor of the reconstruction keeps the L1 norm of
    that tensor of ``vector``. It costs 4 bytes per tensor and task instead of 4 per task; the unification
    study (``matu_lib.unification_study``) measures whether it recovers accuracy a single rescaler loses.
    A tensor whose mask selects nothing gets 1.0, as ``rescaler`` does."""
    _check_vector(vector, "vector")
    _check_vector(unified, "unified")
    n = vector.numel()
    if unified.numel() != n or sum(sizes) != n or any(s <= 0 for s in sizes):
        raise ValueError(
            f"vector ({n}), unified ({unified.numel()}) and the tensor sizes (sum {sum(sizes)}) must "
            f"agree, with every size positive"
        )
    mask = as_bool_mask(mask, n)
    acc = acc_dtype(vector.dtype)
    num = torch.stack([part.abs().sum(dtype=acc) for part in vector.split(list(sizes))])
    den = torch.stack([part.abs().sum(dtype=acc) for part in torch.where(mask, unified, 0).split(list(sizes))])
    if not (torch.isfinite(num).all() and torch.isfinite(den).all()):
        raise ValueError("vector or unified contains NaN/Inf")
    return torch.where(den > 0, num / torch.where(den > 0, den, 1), 1.0).to(vector.dtype)


def reconstruct(unified: Tensor, mask: Tensor, rescaler: float | Tensor, sizes: Sequence[int] | None = None) -> Tensor:
    """lambda_i * (m_i * tau_u): task i's vector as MaTU applies it. ``mask`` may be bool or packed.

    With ``sizes``, ``rescaler`` holds one value per parameter tensor (``tensor_rescalers``)."""
    _check_vector(unified, "unified")
    mask = as_bool_mask(mask, unified.numel())
    if sizes is not None:
        scale = torch.as_tensor(rescaler, dtype=unified.dtype)
        if scale.dim() != 1 or scale.numel() != len(sizes) or sum(sizes) != unified.numel():
            raise ValueError(
                f"{scale.numel()} rescalers for {len(sizes)} tensors of {sum(sizes)} entries; "
                f"unified has {unified.numel()}"
            )
        if not torch.isfinite(scale).all():
            raise ValueError("rescalers must be finite")
        return torch.where(mask, unified * scale.repeat_interleave(torch.tensor(list(sizes))), 0)
    if not math.isfinite(rescaler):
        raise ValueError(f"rescaler must be finite, got {rescaler}")
    return torch.where(mask, unified * rescaler, 0)


# ----------------------------------------------------------------------------- bit-packed masks


def mask_nbytes(n: int) -> int:
    """Bytes of one bit-packed mask over n parameters: ceil(n / 8)."""
    if n < 0:
        raise ValueError(f"mask length must be >= 0, got {n}")
    return (n + 7) // 8


def pack_mask(mask: Tensor) -> Tensor:
    """Pack a 1-D bool mask into uint8, 8 parameters per byte (bit k of byte b = mask[8b + k]).

    The bit order matches ``numpy.packbits(..., bitorder="little")``; unused high bits of the last
    byte are 0, which ``unpack_mask`` checks to catch a wrong length.
    """
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.dim() != 1:
        raise ValueError("pack_mask expects a 1-D bool tensor")
    n = mask.numel()
    padded = torch.zeros(mask_nbytes(n) * 8, dtype=torch.uint8, device=mask.device)
    padded[:n] = mask
    weights = BIT_WEIGHTS.to(mask.device)
    # sum of distinct powers of two < 256 fits in uint8; sum() promotes, so cast back.
    return (padded.view(-1, 8) * weights).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def unpack_mask(packed: Tensor, n: int) -> Tensor:
    """Inverse of ``pack_mask``: the first n bits of ``packed`` as a bool tensor."""
    if not isinstance(packed, Tensor) or packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError("unpack_mask expects a 1-D uint8 tensor from pack_mask")
    if packed.numel() != mask_nbytes(n):
        raise ValueError(f"packed mask has {packed.numel()} bytes, but a mask of length {n} needs {mask_nbytes(n)}")
    bits = (packed.unsqueeze(1) & BIT_WEIGHTS.to(packed.device)) != 0
    flat = bits.view(-1)
    if bool(flat[n:].any()):
        raise ValueError(f"packed mask has set bits beyond length {n}: wrong length or not from pack_mask")
    return flat[:n].clone()


# ----------------------------------------------------------------------------- unify


@dataclass
class Modulators:
    """Per-task state of one client: a mask and a rescaler per task (``masks[i]``, ``rescalers[i]``).

    ``masks`` hold bool tensors or bit-packed uint8 tensors (the upload format); ``length`` is the
    task-vector length, needed to unpack.
    """

    masks: list[Tensor]
    rescalers: list[float]
    length: int

    def __post_init__(self) -> None:
        if len(self.masks) != len(self.rescalers):
            raise ValueError(f"{len(self.masks)} masks but {len(self.rescalers)} rescalers")
        for i, m in enumerate(self.masks):
            expected = {torch.bool: self.length, torch.uint8: mask_nbytes(self.length)}.get(m.dtype)
            if expected is None or m.dim() != 1 or m.numel() != expected:
                raise ValueError(
                    f"mask {i} must be 1-D bool of length {self.length} or packed uint8 of "
                    f"{mask_nbytes(self.length)} bytes, got {m.dtype} of shape {tuple(m.shape)}"
                )

    def __len__(self) -> int:
        return len(self.masks)

    def mask(self, i: int) -> Tensor:
        """Task i's mask as a bool tensor (unpacked if stored packed)."""
        return as_bool_mask(self.masks[i], self.length)

    def packed(self) -> Modulators:
        """The same modulators with bit-packed masks."""
        masks = [m if m.dtype == torch.uint8 else pack_mask(m) for m in self.masks]
        return Modulators(masks, list(self.rescalers), self.length)

    def reconstruct(self, unified: Tensor, i: int) -> Tensor:
        return reconstruct(unified, self.masks[i], self.rescalers[i])

    @property
    def nbytes_per_task(self) -> int:
        """Communication cost of one task's modulators: packed mask + one float32 rescaler."""
        return mask_nbytes(self.length) + 4


CPU_BLOCK_BYTES = 2**22  # a (tasks x slice) float32 block of ~4 MiB stays in cache between the fused steps


def _block_span(n_tasks: int, chunk_size: int, device: torch.device, pack: bool) -> int:
    """Slice length of the fused pass: on CPU small enough that the (tasks x slice) block and its temporaries
    stay in the cache, so every step after the one read of the inputs runs from cache; on a GPU the caller's
    chunk_size (bounded by device memory, not cache). Masks are chunk-invariant and sums are float32 partial
    sums in Python floats either way (module docstring)."""
    span = chunk_size if device.type != "cpu" else min(chunk_size, max(1024, CPU_BLOCK_BYTES // (4 * n_tasks)))
    return -(-span // 8) * 8 if pack else span


def _load_block(chunks: Sequence[Tensor], block: Tensor) -> Tensor:
    """The slices of every task as rows of ``block`` (one read of the inputs; a copy to ``block``'s device)."""
    if chunks[0].device == block.device:
        return torch.stack(chunks, out=block)
    for row, c in zip(block, chunks):
        row.copy_(c, non_blocking=True)
    return block


Backend = Literal["auto", "torch", "numba"]
"""How the fused operators run: "numba" = compiled CPU kernels (``kernels``), "torch" = torch ops on slices (any
device; the reference the kernels are tested against), "auto" = numba where it applies (float32 on CPU), else torch."""


def use_kernels(backend: str, work: torch.device, tensors: Sequence[Tensor]) -> bool:
    """Whether the compiled kernels run this call (see ``Backend``); "numba" where they cannot is an error."""
    from . import kernels

    if backend not in get_args(Backend):
        raise ValueError(f"unknown backend {backend!r}; expected one of {get_args(Backend)}")
    ok = (
        kernels.AVAILABLE
        and work.type == "cpu"
        and all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors)
    )
    if backend == "numba" and not ok:
        raise ValueError(
            "backend='numba' needs the numba package and contiguous float32 CPU tensors "
            f"(numba {'found' if kernels.AVAILABLE else 'missing'}, device {work})"
        )
    return ok and backend != "torch"


def unify_block(
    block: Tensor, rule: str, tie: str, magnitude: str, use_masks: bool, pack: bool, weights: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Elect, mask and rescale one (tasks x slice) block in place: returns (tau_u slice, masks (bool, or packed
    bytes when ``pack``), sum_j |tau_ij| per task, sum_j |m_ij tau_uj| per task). The torch form of the fused pass,
    used on GPUs and as the reference of the compiled kernel."""
    n_tasks, w = block.shape
    acc = acc_dtype(block.dtype)
    total = torch.zeros(w, dtype=acc, device=block.device)
    for row in block:  # task by task, as _elect_sign_chunk: the same rounding, hence the same sign
        total += row
    if rule == "majority":
        total.zero_()
        for row in block:
            total += torch.sign(row)
    s = torch.sign(total)
    if tie != "zero":
        s[s == 0] = -1.0 if tie == "negative" else 1.0
    s = s.to(block.dtype)
    num = block.abs().sum(dim=1, dtype=acc)  # sum_j |tau_ij| per task, before block is overwritten
    block.mul_(s)  # c*s = |c| where c agrees with the elected sign, <= 0 elsewhere
    if magnitude == "max":
        mu = block.amax(dim=0).clamp_(min=0)
        block.clamp_(min=0)
    else:
        block.clamp_(min=0)
        mu = torch.zeros(w, dtype=block.dtype, device=block.device)
        for row in block:  # task by task, as _magnitude_chunk
            mu += row
        mu.div_((block > 0).sum(dim=0).clamp_(min=1).to(block.dtype))
    agree = block > 0 if use_masks else torch.ones(n_tasks, w, dtype=torch.bool, device=block.device)
    # mu >= 0, so this is sum|m_i * tau_u|; with one task its terms equal |c| and they are summed by the
    # same kernel as num, so a single task gets a rescaler of exactly 1.0
    den = torch.where(agree, mu, 0).sum(dim=1, dtype=acc)
    if pack:
        bits = agree
        if w % 8:  # the last slice: pad with zeros to whole bytes (unused high bits stay 0, as pack_mask)
            bits = torch.zeros(n_tasks, mask_nbytes(w) * 8, dtype=torch.bool, device=block.device)
            bits[:, :w] = agree
        agree = (bits.view(n_tasks, -1, 8).to(torch.uint8) * weights).sum(dim=2, dtype=torch.int32).to(torch.uint8)
    return s * mu, agree, num, den


def _unify_kernels(
    vectors: Sequence[Tensor], n: int, rule: str, tie: str, magnitude: str, use_masks: bool, pack: bool
) -> tuple[Tensor, Tensor, list[float], list[float]]:
    """``unify``'s pass with the compiled kernel: (tau_u, masks as a (tasks x ...) tensor, num, den)."""
    from . import kernels

    n_tasks = len(vectors)
    unified = torch.empty(n, dtype=torch.float32)
    masks = torch.empty(n_tasks, mask_nbytes(n) if pack else n, dtype=torch.uint8 if pack else torch.bool)
    num = torch.zeros(kernels.N_GROUPS, n_tasks, dtype=torch.float64)
    den = torch.zeros_like(num)
    bad = torch.zeros(kernels.N_GROUPS, dtype=torch.uint8)
    kernels.match_torch_threads()
    kernels.unify_kernel(
        kernels.typed_list([v.numpy() for v in vectors]),
        n,
        kernels.block_columns(n_tasks),
        rule == "majority",
        kernels.TIES[tie],
        magnitude == "mean",
        use_masks,
        pack,
        unified.numpy(),
        masks.view(torch.uint8).numpy(),
        num.numpy(),
        den.numpy(),
        bad.numpy(),
    )
    if bool(bad.any()):  # the torch operator finds and names the offending vector
        for a, b in spans(n, DEFAULT_CHUNK_SIZE):
            chunks = [v[a:b] for v in vectors]
            raise_if_not_finite(chunks, sum(chunks[1:], chunks[0].clone()), a)
    return unified, masks, num.sum(dim=0).tolist(), den.sum(dim=0).tolist()


def unify(
    vectors: Sequence[Tensor],
    rule: ElectRule = "sum",
    tie: TieRule = "negative",
    use_masks: bool = True,
    use_rescalers: bool = True,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    pack: bool = False,
    magnitude: Magnitude = "max",
    device: str | torch.device | None = None,
    backend: Backend = "auto",
) -> tuple[Tensor, list[Tensor], list[float]]:
    """Elect, mask and rescale in one streaming pass: returns (tau_u, masks, rescalers).

    ``use_masks=False`` gives all-ones masks (ablation: every task sees the whole tau_u);
    ``use_rescalers=False`` gives rescalers of 1.0. With ``pack=True`` masks come back bit-packed
    (uint8, ceil(n/8) bytes) so 30 masks of 88M parameters take 330 MB instead of 2.6 GB; the chunk
    size is then rounded up to a multiple of 8 so each slice packs to whole bytes. Rescalers are
    computed against the masks actually returned (all-ones masks when ``use_masks=False``), so the
    reconstruction keeps each task's L1 norm in every ablation that uses rescalers.

    The pass is fused: each slice of all tasks is read once into a (tasks x slice) block and every step
    (election, magnitude, masks, rescaler sums) works on that block, so the only temporaries are O(tasks x slice)
    and, on CPU, the slice is cache-sized. On CPU with float32 inputs a compiled kernel runs it (``backend``,
    ``kernels``); ``device`` (e.g. "cuda") runs the torch form there, one slice at a time, and returns the results
    on the inputs' device. Sums are accumulated task by task in input order, exactly as the unfused operators
    (``elect_sign``, ``elect_magnitude``) do, so tau_u and the masks are bit-identical to theirs on every backend.
    """
    n, dtype = check_vectors(vectors)
    _check_rules(rule, tie, magnitude)
    _check_chunk_size(chunk_size)
    home = vectors[0].device
    work = torch.device(device) if device is not None else home
    n_tasks = len(vectors)
    if use_kernels(backend, work, vectors):
        unified, masks, num, den = _unify_kernels(vectors, n, rule, tie, magnitude, use_masks, pack)
    else:
        span = _block_span(n_tasks, chunk_size, work, pack)
        unified = torch.empty(n, dtype=dtype, device=home)
        masks = torch.empty(
            n_tasks, mask_nbytes(n) if pack else n, dtype=torch.uint8 if pack else torch.bool, device=home
        )
        num = [0.0] * n_tasks
        den = [0.0] * n_tasks
        weights = BIT_WEIGHTS.to(work)
        full_block = torch.empty(n_tasks, min(span, n), dtype=dtype, device=work)
        for a, b in spans(n, span):
            w = b - a
            block = _load_block(
                [v[a:b] for v in vectors],
                full_block if w == full_block.shape[1] else torch.empty(n_tasks, w, dtype=dtype, device=work),
            )
            total = block.sum(dim=0, dtype=acc_dtype(dtype))
            raise_if_not_finite(list(block), total, a)
            u, m, num_chunk, den_chunk = unify_block(block, rule, tie, magnitude, use_masks, pack, weights)
            unified[a:b].copy_(u, non_blocking=True)
            masks[:, a // 8 : mask_nbytes(b)].copy_(m, non_blocking=True) if pack else masks[:, a:b].copy_(
                m, non_blocking=True
            )
            for i, (x, y) in enumerate(zip(num_chunk.tolist(), den_chunk.tolist())):
                num[i] += x
                den[i] += y
        if work.type == "cuda":
            torch.cuda.synchronize(work)
    rescalers = [rescaler_ratio(x, y) if use_rescalers else 1.0 for x, y in zip(num, den)]
    return unified, list(masks.unbind(0)), rescalers


def mask_slice(mask: Tensor | None, a: int, b: int, n: int) -> Tensor | None:
    """Entries a:b of a bool or bit-packed mask as bool (a must be a multiple of 8 for packed masks)."""
    if mask is None or mask.dtype == torch.bool:
        return None if mask is None else mask[a:b]
    bits = (mask[a // 8 : mask_nbytes(b)].unsqueeze(1) & BIT_WEIGHTS.to(mask.device)) != 0
    return bits.view(-1)[: b - a]


def unify_modulators(vectors: Sequence[Tensor], **options) -> tuple[Tensor, Modulators]:
    """``unify`` returning the masks and rescalers bundled as ``Modulators`` (keyword options pass through)."""
    unified, masks, rescalers = unify(vectors, **options)
    return unified, Modulators(masks, rescalers, unified.numel())
