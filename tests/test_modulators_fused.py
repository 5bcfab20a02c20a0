"""The fused, slice-by-slice server operators against the plain operators they replace (oracles).

``unify`` works on cache-sized (tasks x slice) blocks and the server round (``aggregation.server_round``) averages,
measures and re-unifies one slice at a time, each as compiled kernels (``kernels``, CPU) and as torch ops (any
device). Both forms must give exactly what the unfused operators give on arbitrary float32 inputs (where summation
order matters), whatever the slice length, and the same numbers as each other on any number of threads.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch

import matu_lib.aggregation as agg
import matu_lib.modulators as mod
import matu_lib.server as srv
from matu_lib.aggregation import Holding, apply_transfer, server_round, similarity_matrix, transfer_weights
from matu_lib.communication import Payload
from matu_lib.modulators import (
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
@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_fused_unify_equals_unfused_operators(tiny_blocks, magnitude, rule, tie, pack, backend):
    vs = _vectors(7, 5003, seed=1)
    unified, masks, scales = unify(vs, rule, tie, magnitude=magnitude, pack=pack, backend=backend)
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


def _holdings(n: int, seed: int):
    """Four uploads holding overlapping tasks, masks in every accepted form (bool, packed, absent = all ones)."""
    held = [("a", "b"), ("b", "c", "d"), ("a", "d"), ("c",)]
    uploads, holders = [], {}
    for k, tasks in enumerate(held):
        unified, masks, scales = unify(_vectors(len(tasks), n, seed + k), magnitude="mean")
        uploads.append(unified)
        for i, t in enumerate(tasks):
            mask = [masks[i], pack_mask(masks[i]), None][(k + i) % 3]
            holders.setdefault(t, []).append(Holding(k, mask, scales[i], 10.0 + k + i))
    return uploads, holders, held


FIXED_W = transfer_weights(
    torch.tensor([[1.0, 0.5, 0.2, -1.0], [0.5, 1.0, 0.3, 0.1], [0.2, 0.3, 1.0, 0.0], [-1.0, 0.1, 0.0, 1.0]]), 0.1, 0.0
)


@pytest.mark.parametrize("metric", ["cosine", "sign"])
@pytest.mark.parametrize("transfer", [False, True])
@pytest.mark.parametrize(
    "magnitude,rule,pack,use_masks",
    [
        ("mean", "sum", False, True),
        ("max", "majority", True, True),
        ("max", "majority", False, True),
        ("mean", "sum", False, False),
    ],
)
def test_server_round_kernel_equals_torch_form(metric, transfer, magnitude, rule, pack, use_masks):
    """The compiled round and its torch form (the GPU path) give the same downloads, element for element (groups of
    one, two and three tasks: two-task groups take the kernel's one-pass path unless masks are packed)."""
    uploads, holders, held = _holdings(20011, seed=5)
    opts = dict(rule=rule, tie="negative", magnitude=magnitude, use_masks=use_masks, use_rescalers=True, pack=pack)
    fixed = (lambda sim: FIXED_W) if transfer else None  # W independent of the similarity's last bits
    a = server_round(uploads, holders, held, metric, fixed, backend="torch", chunk_size=4096, **opts)
    b = server_round(uploads, holders, held, metric, fixed, backend="numba", **opts)
    assert torch.allclose(a.similarity, b.similarity, atol=1e-6)
    for (u1, m1, r1), (u2, m2, r2) in zip(a.outputs, b.outputs):
        assert torch.equal(u1, u2) and all(torch.equal(x, y) for x, y in zip(m1, m2))
        assert r1 == pytest.approx(r2, rel=1e-5)


def test_server_round_similarity_and_transfer_match_the_plain_operators():
    """Streamed similarity equals ``similarity_matrix`` of the materialised averages; transfer mixes them by W."""
    uploads, holders, held = _holdings(3001, seed=7)
    plain = {}
    for t, hs in holders.items():
        acc = None
        for h in hs:
            rec = reconstruct(
                uploads[h.upload], h.mask if h.mask is not None else torch.ones(3001, dtype=torch.bool), h.rescaler
            )
            acc = rec * h.weight if acc is None else acc + rec * h.weight
        plain[t] = acc / sum(h.weight for h in hs)
    tasks = sorted(plain)
    for backend in ("torch", "numba"):
        res = server_round(
            uploads,
            holders,
            [tuple(tasks)],
            "cosine",
            lambda sim: FIXED_W,
            rule="sum",
            tie="negative",
            magnitude="mean",
            use_masks=True,
            use_rescalers=True,
            backend=backend,
        )
        assert torch.allclose(res.similarity, similarity_matrix([plain[t] for t in tasks]), atol=1e-6)
        ref = unify(apply_transfer([plain[t] for t in tasks], FIXED_W), magnitude="mean", backend="torch")
        assert torch.equal(res.outputs[0][0], ref[0]) and all(
            torch.equal(x, y) for x, y in zip(res.outputs[0][1], ref[1])
        )


def test_server_round_rejects_bad_input():
    v = torch.ones(16)
    opts = dict(rule="sum", tie="negative", magnitude="mean", use_masks=True, use_rescalers=True)
    with pytest.raises(ValueError, match="names a task nobody uploaded"):
        server_round([v], {"a": [Holding(0, None, 1.0, 1.0)]}, [("a", "b")], **opts)
    with pytest.raises(OverflowError, match="task 'a'"):
        server_round([v], {"a": [Holding(0, None, 1.0, 0.0)]}, [("a",)], **opts)
    for backend in ("torch", "numba"):  # finite uploads whose weighted average overflows float32
        big = torch.full((16,), 3e38)
        with pytest.raises(OverflowError, match="task 'a'"):
            server_round(
                [big, big],
                {"a": [Holding(0, None, 1.0, 1.0), Holding(1, None, 1.0, 1.0)]},
                [("a",)],
                backend=backend,
                **opts,
            )


@pytest.mark.parametrize("magnitude", ["max", "mean"])
@pytest.mark.parametrize("rule,tie", [("sum", "negative"), ("majority", "zero"), ("sum", "positive")])
@pytest.mark.parametrize("pack,use_masks", [(False, True), (True, True), (True, False)])
def test_unify_kernel_equals_torch_form(magnitude, rule, tie, pack, use_masks):
    vs = _vectors(30, 20003, seed=8)
    a = unify(vs, rule, tie, use_masks=use_masks, magnitude=magnitude, pack=pack, backend="torch")
    b = unify(vs, rule, tie, use_masks=use_masks, magnitude=magnitude, pack=pack, backend="numba")
    assert torch.equal(a[0], b[0]) and all(torch.equal(x, y) for x, y in zip(a[1], b[1]))
    assert a[2] == pytest.approx(b[2], rel=1e-5)


def test_kernels_give_the_same_numbers_on_any_number_of_threads():
    """Partial sums are per fixed group of blocks, not per thread: one thread and two give identical outputs."""
    import numba

    vs = _vectors(6, 50021, seed=9)
    uploads, holders, held = _holdings(50021, seed=11)
    opts = dict(rule="sum", tie="negative", magnitude="mean", use_masks=True, use_rescalers=True)
    before = torch.get_num_threads()
    try:  # the kernels follow torch's thread count (kernels.match_torch_threads)
        torch.set_num_threads(1)
        one = unify(vs, magnitude="mean", pack=True, backend="numba"), server_round(uploads, holders, held, **opts)
        assert numba.get_num_threads() == 1
        torch.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        two = unify(vs, magnitude="mean", pack=True, backend="numba"), server_round(uploads, holders, held, **opts)
        assert numba.get_num_threads() == min(2, numba.config.NUMBA_NUM_THREADS)
    finally:
        torch.set_num_threads(before)
    assert one[0][2] == two[0][2] and torch.equal(one[0][0], two[0][0])
    assert torch.equal(one[1].similarity, two[1].similarity)
    assert all(r1 == r2 and torch.equal(u1, u2) for (u1, _, r1), (u2, _, r2) in zip(one[1].outputs, two[1].outputs))


def test_unify_kernel_names_the_vector_with_nan():
    vs = _vectors(3, 5000, seed=12)
    vs[2][4321] = float("nan")
    with pytest.raises(ValueError, match="task vector 2 contains NaN/Inf"):
        unify(vs, backend="numba")
    with pytest.raises(ValueError, match="backend"):
        unify(vs, backend="fortran")


@pytest.mark.parametrize("n_tasks", [2, 3])
def test_unify_kernel_reports_an_overflowing_election_sum(n_tasks):
    """Finite vectors whose sum overflows float32 (two tasks take the kernel's one-pass path, which checks only
    where the rows' magnitudes allow an overflow): the same error as the torch operator, nothing returned."""
    vs = _vectors(n_tasks, 5000, seed=13)
    for v in vs:
        v[1234] = 2e38
    for backend in ("torch", "numba"):
        with pytest.raises(ValueError, match="overflows near index"):
            unify(vs, backend=backend)


@pytest.mark.parametrize("magnitude,rule", [("mean", "sum"), ("max", "majority")])
def test_two_rows_too_large_to_rule_out_an_overflow_still_unify_exactly(magnitude, rule):
    """Two finite rows whose |entries| sum past float32's range (so the one-pass path must check every column) but
    whose election sums are all finite: the checked loop gives the torch operator's tau_u and masks."""
    vs = _vectors(2, 5000, seed=17)
    vs[0][10], vs[1][20] = 2e38, -2e38  # |entries| sum to 4e38 > 3.4e38 within one block
    a = unify(vs, rule, "negative", magnitude=magnitude, backend="torch")
    b = unify(vs, rule, "negative", magnitude=magnitude, backend="numba")
    assert torch.equal(a[0], b[0]) and all(torch.equal(x, y) for x, y in zip(a[1], b[1]))
    assert a[2] == pytest.approx(b[2], rel=1e-5)


def _reference_aggregate(server: MaTUServer, uploads: list[Payload]) -> dict[int, Payload]:
    """The server round written plainly: reconstruct every upload, average per task, re-unify per client."""
    from matu_lib.communication import payload_task_vector, unify_payload

    sums, counts = {}, {}
    for up in uploads:
        for t in up.tasks:
            vec = payload_task_vector(up, t)
            n = float(up.counts[t])
            sums[t] = sums[t] + vec * n if t in sums else vec.float() * n  # each term rounded, then added
            counts[t] = counts.get(t, 0.0) + n
    shared = {t: sums[t] / counts[t] for t in sums}
    options = (server.rule, server.tie, server.use_masks, server.use_rescalers, server.magnitude)
    return {
        up.client_id: unify_payload(up.client_id, up.tasks, [shared[t] for t in up.tasks], {}, *options)
        for up in uploads
    }


@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_server_round_equals_plain_reconstruct_average_reunify(tiny_blocks, backend, monkeypatch):
    from matu_lib.communication import unify_payload

    held = [("a", "b"), ("b", "c", "d"), ("a", "d")]
    uploads = []
    for k, tasks in enumerate(held):
        vs = _vectors(len(tasks), 2051, seed=10 + k)
        uploads.append(
            unify_payload(
                k, tasks, vs, {t: 10 + k + i for i, t in enumerate(tasks)}, "sum", "negative", True, True, "mean"
            )
        )
    server = MaTUServer(magnitude="mean")
    monkeypatch.setattr(srv, "server_round", partial(agg.server_round, backend=backend))
    downloads, _ = server.aggregate(uploads)
    expected = _reference_aggregate(server, uploads)
    for k, down in downloads.items():
        ref = expected[k]
        assert torch.equal(down.vectors["unified"], ref.vectors["unified"])
        assert all(torch.equal(down.masks[t], ref.masks[t]) for t in ref.masks)
        assert down.rescalers == pytest.approx(ref.rescalers, rel=1e-6)


@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_consumed_uploads_hold_the_same_downloads(tiny_blocks, backend, monkeypatch):
    """``aggregate(consume=True)`` writes each download over its client's upload: the same numbers as a round into
    new buffers, in the uploads' own memory (one- and two-task clients, a task held by three)."""
    import copy

    from matu_lib.communication import unify_payload

    held = [("a", "b"), ("b", "c"), ("a", "c"), ("b",)]
    uploads = []
    for k, tasks in enumerate(held):
        vs = _vectors(len(tasks), 3001, seed=20 + k)
        uploads.append(
            unify_payload(
                k, tasks, vs, {t: 5 + k + i for i, t in enumerate(tasks)}, "sum", "negative", True, True, "mean"
            )
        )
    owned = copy.deepcopy(uploads)
    server = MaTUServer(magnitude="mean")
    monkeypatch.setattr(srv, "server_round", partial(agg.server_round, backend=backend))
    fresh, info = server.aggregate(uploads)
    consumed, info2 = server.aggregate(owned, consume=True)
    assert info2["similarity_vector"] == info["similarity_vector"]
    for up in owned:
        a, b = fresh[up.client_id], consumed[up.client_id]
        assert torch.equal(a.vectors["unified"], b.vectors["unified"]) and a.rescalers == b.rescalers
        assert all(torch.equal(a.masks[t], b.masks[t]) for t in up.tasks)
        assert b.vectors["unified"].data_ptr() == up.vectors["unified"].data_ptr()
        assert all(b.masks[t].data_ptr() == up.masks[t].data_ptr() for t in up.tasks)
    assert not any(
        fresh[k].vectors["unified"].data_ptr() == u.vectors["unified"].data_ptr() for k, u in enumerate(uploads)
    )


def test_server_round_output_buffers_are_checked():
    uploads, holders, held = _holdings(512, seed=1)
    opts = dict(rule="sum", tie="negative", magnitude="mean", use_masks=True, use_rescalers=True)
    good = [(torch.empty(512), [torch.empty(512, dtype=torch.bool) for _ in g]) for g in held]
    with pytest.raises(ValueError, match="3 output buffers for 4 download groups"):
        server_round(uploads, holders, held, out=good[:3], **opts)
    wrong = list(good)
    wrong[1] = (torch.empty(512), [torch.empty(512, dtype=torch.uint8) for _ in held[1]])
    with pytest.raises(ValueError, match=r"group \('b', 'c', 'd'\)"):
        server_round(uploads, holders, held, out=wrong, **opts)
    res = server_round(uploads, holders, held, out=good, **opts)
    ref = server_round(uploads, holders, held, **opts)
    assert all(u is b[0] and torch.equal(u, r[0]) for (u, _, _), b, r in zip(res.outputs, good, ref.outputs))


def test_a_kernel_leaves_torch_thread_count_alone():
    """numba's OpenMP layer used to raise torch's OpenMP thread count after one kernel (OMP_NUM_THREADS=1 then
    meant 2 threads, and two training processes on 2 cores ran 50x slower)."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        unify(_vectors(4, 30011, seed=3), magnitude="mean", backend="numba")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("n_rows", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("w", [1, 7, 64, 66, 100, 2176])
@pytest.mark.parametrize("sign", [False, True])
def test_gram_block_is_the_documented_tree_sum_of_products(n_rows, w, sign):
    """A block's Gram entry is the float32 tree sum (``_tree_sum``) of the column products, bit for bit, on every
    path of ``_gram_block``: halvings folded into the products (w a multiple of 4, rows taken two at a time, odd and
    even row counts) and the plain one (any other w)."""
    import numpy as np

    from matu_lib import kernels

    g = np.random.default_rng(n_rows * 1000 + w)
    buf = (g.standard_normal((n_rows, w)) * 10.0 ** g.integers(-3, 2, (n_rows, w))).astype(np.float32)
    buf[g.random((n_rows, w)) < 0.2] = 0.0
    gram = np.zeros((n_rows, n_rows))
    kernels._gram_block(buf, w, sign, gram, np.empty_like(buf), np.empty(w, np.float32))
    src = np.sign(buf).astype(np.float32) if sign else buf
    for p in range(n_rows):
        for q in range(n_rows):
            want = kernels._tree_sum((src[p] * src[q]).astype(np.float32), w) if q >= p else 0.0
            assert gram[p, q] == want, (p, q)
