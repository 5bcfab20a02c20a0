"""The fused, slice-by-slice server operators against the plain operators they replace (oracles).

``unify`` works on cache-sized (tasks x slice) blocks and the server averages reconstructions one slice at a time;
both must give exactly what the unfused operators give on arbitrary float32 inputs (where summation order
matters), whatever the slice length.
"""

from __future__ import annotations

import pytest
import torch

import matu_lib.modulators as mod
from matu_lib.communication import Payload
from matu_lib.modulators import (
    average_reconstructions,
    elect_magnitude,
    elect_sign,
    pack_mask,
    reconstruct,
    rescaler,
    task_mask,
    unify,
)
from matu_lib.server import MaTUServer


def _vectors(n_tasks: int, n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    vs = [torch.randn(n, generator=g) * 10 ** torch.randint(-3, 2, (n,), generator=g) for _ in range(n_tasks)]
    for v in vs:
        v[torch.rand(n, generator=g) < 0.2] = 0.0
    return vs


@pytest.fixture()
def tiny_blocks(monkeypatch):
    """Force many small blocks (slices of 1024 entries) so slice boundaries are exercised on small inputs."""
    monkeypatch.setattr(mod, "CPU_BLOCK_BYTES", 1)


@pytest.mark.parametrize("magnitude", ["max", "mean"])
@pytest.mark.parametrize("rule,tie", [("sum", "negative"), ("majority", "zero"), ("sum", "positive")])
@pytest.mark.parametrize("pack", [False, True])
def test_fused_unify_equals_unfused_operators(tiny_blocks, magnitude, rule, tie, pack):
    vs = _vectors(7, 5003, seed=1)
    unified, masks, scales = unify(vs, rule, tie, magnitude=magnitude, pack=pack)
    sign = elect_sign(vs, rule, tie, chunk_size=5003)
    ref_unified = torch.sign(sign).float() * elect_magnitude(vs, sign, chunk_size=5003, magnitude=magnitude)
    assert torch.equal(unified, ref_unified)
    for v, m, s in zip(vs, masks, scales):
        ref_mask = task_mask(v, ref_unified)
        assert torch.equal(m, pack_mask(ref_mask) if pack else ref_mask)
        assert s == pytest.approx(rescaler(v, ref_mask, ref_unified), rel=1e-5)


def test_fused_unify_explicit_cpu_device_and_large_chunk_agree(tiny_blocks):
    vs = _vectors(4, 3001, seed=2)
    a = unify(vs, magnitude="mean", device="cpu")
    b = unify(vs, magnitude="mean", chunk_size=3)
    assert torch.equal(a[0], b[0]) and all(torch.equal(x, y) for x, y in zip(a[1], b[1]))
    assert a[2] == pytest.approx(b[2], rel=1e-6)


def test_single_task_rescaler_stays_exactly_one(tiny_blocks):
    v = _vectors(1, 4099, seed=3)[0]
    unified, masks, scales = unify([v], magnitude="mean")
    assert scales == [1.0] and torch.equal(reconstruct(unified, masks[0], scales[0]), v)


@pytest.mark.parametrize("chunk_size", [8, 24, 1 << 22])
def test_average_reconstructions_equals_reconstruct_then_average(chunk_size):
    n = 1001  # not a multiple of 8: the last packed byte is partial
    vs = _vectors(4, n, seed=4)
    unified, masks, scales = unify(vs, magnitude="mean")
    kinds = [masks[0], pack_mask(masks[1]), None, masks[3]]  # bool, packed, absent (all ones), bool
    counts = [5.0, 3.0, 7.0, 1.0]
    ref = None
    for m, r, w in zip(kinds, scales, counts):
        vec = reconstruct(unified, m if m is not None else torch.ones(n, dtype=torch.bool), r)
        ref = ref.add_(vec, alpha=w) if ref is not None else vec.float() * w
    ref = ref / sum(counts)
    got = average_reconstructions([unified] * 4, kinds, scales, counts, chunk_size=chunk_size)
    assert torch.equal(got, ref)


def test_average_reconstructions_rejects_bad_input():
    v = torch.ones(4)
    with pytest.raises(ValueError, match="weights"):
        average_reconstructions([v], [None], [1.0], [0.0])
    with pytest.raises(ValueError, match="2 vectors, 1 masks"):
        average_reconstructions([v, v], [None], [1.0, 1.0], [1.0, 1.0])


def _reference_aggregate(server: MaTUServer, uploads: list[Payload]) -> dict[int, Payload]:
    """The server round written plainly: reconstruct every upload, average per task, re-unify per client."""
    from matu_lib.communication import payload_task_vector, unify_payload

    sums, counts = {}, {}
    for up in uploads:
        for t in up.tasks:
            vec = payload_task_vector(up, t)
            n = float(up.counts[t])
            sums[t] = sums[t].add_(vec, alpha=n) if t in sums else vec.float() * n
            counts[t] = counts.get(t, 0.0) + n
    shared = {t: sums[t] / counts[t] for t in sums}
    options = (server.rule, server.tie, server.use_masks, server.use_rescalers, server.magnitude)
    return {up.client_id: unify_payload(up.client_id, up.tasks, [shared[t] for t in up.tasks], {}, *options)
            for up in uploads}


def test_server_round_equals_plain_reconstruct_average_reunify(tiny_blocks):
    from matu_lib.communication import unify_payload

    held = [("a", "b"), ("b", "c", "d"), ("a", "d")]
    uploads = []
    for k, tasks in enumerate(held):
        vs = _vectors(len(tasks), 2051, seed=10 + k)
        uploads.append(unify_payload(k, tasks, vs, {t: 10 + k + i for i, t in enumerate(tasks)},
                                     "sum", "negative", True, True, "mean"))
    server = MaTUServer(magnitude="mean")
    downloads, _ = server.aggregate(uploads)
    expected = _reference_aggregate(server, uploads)
    for k, down in downloads.items():
        ref = expected[k]
        assert torch.equal(down.vectors["unified"], ref.vectors["unified"])
        assert all(torch.equal(down.masks[t], ref.masks[t]) for t in ref.masks)
        assert down.rescalers == pytest.approx(ref.rescalers, rel=1e-6)
