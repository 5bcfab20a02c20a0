"""Compressors: exact bytes, error bounds, error feedback, and refusal of bad blobs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from matu_lib.compression import (
    BITS,
    Quantized,
    dequantize,
    encode_with_feedback,
    entropy_bits,
    mask_bytes,
    mask_from_bytes,
    pack_codes,
    quantize,
    topk,
    unpack_codes,
)


def _vector(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(n, generator=g) * 10 ** torch.randint(-4, 1, (n,), generator=g)
    v[torch.rand(n, generator=g) < 0.2] = 0.0
    return v


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([1, 2, 4, 8]), n=st.integers(1, 300), seed=st.integers(0, 10**6))
def test_codes_pack_and_unpack(bits, n, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (n,), generator=g, dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.numel() == -(-n * bits // 8)
    assert torch.equal(unpack_codes(packed, bits, n), codes)


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("n,block", [(1000, 64), (4097, 4096), (5, 4096)])
def test_uniform_quantiser_error_is_at_most_half_a_step(bits, n, block):
    v = _vector(n, seed=bits * 7 + n)
    q = quantize(v, bits, block)
    err = (dequantize(q) - v).abs()
    step = q.scales.repeat_interleave(block)[:n]
    assert bool((err <= step / 2 + 1e-6 * step).all())
    assert bool((dequantize(q)[v == 0] == 0).all())  # zero is a code: sparse updates stay sparse


def test_sign_code_uses_the_l1_scale_per_block():
    v = torch.tensor([3.0, -1.0, 0.0, 2.0, -4.0, 4.0])
    q = quantize(v, 1, block=3)
    assert torch.allclose(q.scales, torch.tensor([4 / 3, 10 / 3]))
    assert torch.allclose(dequantize(q), torch.tensor([4 / 3, -4 / 3, -4 / 3, 10 / 3, -10 / 3, 10 / 3]))


@pytest.mark.parametrize("bits", BITS)
def test_bytes_round_trip_and_size_is_the_serialised_size(bits):
    v = _vector(10_001, seed=bits)
    q = quantize(v, bits, block=512)
    blob = q.to_bytes()
    assert q.nbytes == len(blob)
    back = Quantized.from_bytes(blob, max_length=10_001)
    assert torch.equal(dequantize(back), dequantize(q))
    if bits == 32:
        assert torch.equal(dequantize(back), v)
    else:  # payload shrinks with the bit width: codes + one float32 per block + header
        assert len(blob) < 10_001 * bits / 8 + 4 * 20 + 64


def test_error_feedback_carries_exactly_what_quantisation_dropped():
    """Over rounds, the sum of what was sent equals the sum of the updates minus the last residual."""
    updates = [_vector(3000, seed=s) for s in range(6)]
    residual, sent = None, torch.zeros(3000)
    for u in updates:
        q, residual = encode_with_feedback(u, residual, bits=1, block=256)
        sent += q.decode()
    assert torch.allclose(sent + residual, torch.stack(updates).sum(0), atol=1e-5)
    # without feedback the 1-bit error accumulates; with it, the residual stays one round's error
    no_fb = sum(dequantize(quantize(u, 1, 256)) for u in updates)
    truth = torch.stack(updates).sum(0)
    assert (sent - truth).norm() < (no_fb - truth).norm()


@pytest.mark.parametrize(
    "corrupt,message",
    [
        (lambda b: b[:10], "shorter than its header"),
        (lambda b: b"XXX" + b[3:], "bad magic"),
        (lambda b: b[:3] + bytes([3]) + b[4:], "unsupported bit width"),
        (lambda b: b[:-1], "bytes, expected"),
        (lambda b: b + b"\0", "bytes, expected"),
    ],
)
def test_bad_blobs_are_refused_with_a_reason(corrupt, message):
    blob = quantize(_vector(100, seed=1), 4, block=16).to_bytes()
    with pytest.raises(ValueError, match=message):
        Quantized.from_bytes(corrupt(blob))


def test_out_of_range_code_and_oversized_length_are_refused():
    blob = bytearray(quantize(_vector(100, seed=2), 2, block=16).to_bytes())
    blob[-1] = 0xFF  # code 3 does not exist in the ternary code
    with pytest.raises(ValueError, match="exceeds the 2-bit range"):
        Quantized.from_bytes(bytes(blob))
    with pytest.raises(ValueError, match="exceeds the expected"):
        Quantized.from_bytes(quantize(_vector(100, seed=2), 8).to_bytes(), max_length=99)
    with pytest.raises(ValueError, match="NaN/Inf"):
        quantize(torch.tensor([1.0, float("nan")]), 8)


def test_topk_keeps_the_largest_and_breaks_ties_by_position():
    v = torch.tensor([0.5, -3.0, 1.0, -1.0, 2.0])
    keep, values = topk(v, 0.6)
    assert keep.tolist() == [False, True, True, False, True] and values.tolist() == [-3.0, 1.0, 2.0]


def test_sparse_mask_coding_is_close_to_entropy_and_round_trips():
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(200_000, generator=g) < 0.02
    blob = mask_bytes(mask, "zstd")
    assert torch.equal(mask_from_bytes(blob, mask.numel(), "zstd"), mask)
    assert len(blob) * 8 < 0.45 * len(mask_bytes(mask, "packed")) * 8  # far below 1 bit per entry
    assert len(blob) * 8 < 1.6 * entropy_bits(mask)  # and within 1.6x of the ideal coder
    with pytest.raises(ValueError, match="corrupt|expands"):
        mask_from_bytes(blob[:-5], mask.numel(), "zstd")
