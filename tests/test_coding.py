"""Coded vectors on the wire: quantised and top-k uploads and downloads, for MaTU and the FedAvg family.

What must hold: counted bytes are the serialised bytes; a receiver decodes exactly what the sender computed
with (so error feedback subtracts the right thing); sparse unified vectors carry mask bits only on their
support; corrupt coded payloads give one clear error; a coded run resumes to the same numbers.
"""

import dataclasses
import math
import struct

import pytest
import torch

from matu_lib.communication import Payload, PayloadError, code_vectors, payload_task_vector, unify_payload
from matu_lib.compression import encode
from matu_lib.federation import build_context, run, without_timings
from matu_lib.methods import METHODS
from matu_lib.presets import preset

CODED = {"upload_bits": 1, "upload_topk": 0.25, "download_bits": 4}


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def ctx():
    return build_context(preset("smoke", rounds=2, local_steps=2), log=quiet)


def coded(ctx, **overrides):
    return dataclasses.replace(ctx, cfg=dataclasses.replace(ctx.cfg, **{**CODED, **overrides}))


def _vectors(n=2000, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g) * 0.01 for _ in range(k)]


@pytest.mark.parametrize("bits,fraction", [(8, 1.0), (4, 0.5), (2, 1.0), (1, 1.0), (1, 0.1), (32, 0.3)])
def test_coded_payload_round_trips_and_counts_its_serialised_bytes(bits, fraction):
    tasks = ("a", "b", "c")
    plain = unify_payload(1, tasks, _vectors(), dict.fromkeys(tasks, 5), "sum", "negative", True, True, "mean")
    p = unify_payload(
        1,
        tasks,
        _vectors(),
        dict.fromkeys(tasks, 5),
        "sum",
        "negative",
        True,
        True,
        "mean",
        bits=bits,
        fraction=fraction,
        block=256,
    )
    blob = p.to_bytes()
    assert p.nbytes()["total"] == len(blob)
    assert len(blob) < len(plain.to_bytes())
    back = Payload.from_bytes(blob)
    for t in tasks:  # the receiver reconstructs exactly what the sender holds
        assert torch.equal(payload_task_vector(back, t), payload_task_vector(p, t))
    support = int((p.vectors["unified"] != 0).sum()) if fraction < 1 else 2000
    assert p.nbytes()["masks"] == 3 * math.ceil(support / 8)  # mask bits only where tau_u can be non-zero
    if fraction < 1:
        assert support == round(fraction * 2000)


def test_sparse_masks_travel_on_the_support_only_hand_example():
    """tau_u = [0.1, -3, 0.2, 4] keeps positions 1 and 3 at top-k 0.5; mask [T, T, F, T] sends bits [T, T]."""
    unified = torch.tensor([0.1, -3.0, 0.2, 4.0])
    c = code_vectors({"unified": unified}, 32, 0.5)
    p = Payload(
        0, ("a",), {"unified": unified}, {"a": torch.tensor([True, True, False, True])}, {"a": 1.0}, {"a": 1}, coded=c
    )
    assert torch.equal(p.vectors["unified"], torch.tensor([0.0, -3.0, 0.0, 4.0]))
    assert torch.equal(p.masks["a"], torch.tensor([False, True, False, True]))
    assert p.nbytes()["masks"] == 1
    back = Payload.from_bytes(p.to_bytes())
    assert torch.equal(back.masks["a"], p.masks["a"])
    assert torch.equal(payload_task_vector(back, "a"), torch.tensor([0.0, -3.0, 0.0, 4.0]))


def _header(blob: bytes) -> tuple[int, bytes]:
    (n,) = struct.unpack_from("<Q", blob)
    return n, blob[8 : 8 + n]


def _with_header(blob: bytes, old: bytes, new: bytes) -> bytes:
    n, header = _header(blob)
    header = header.replace(old, new)
    return struct.pack("<Q", len(header)) + header + blob[8 + n :]


@pytest.mark.parametrize(
    "corrupt,message",
    [
        (lambda b: b[:-7], "truncated"),
        (
            lambda b: _with_header(b, b'"coded":{"unified":[2000,', b'"coded":{"unified":[1999,'),
            "length 2000, expected 1999",
        ),
        (
            lambda b: _with_header(b, b'"coded":{"unified":[2000,', b'"coded":{"unified":[99999999999,'),
            "length of coded",
        ),
        (lambda b: _with_header(b, b'"masks":{"a":200', b'"masks":{"a":201'), "non-zero entries|bytes"),
    ],
)
def test_corrupt_coded_payload_is_refused_with_one_clear_error(corrupt, message):
    tasks = ("a", "b")
    p = unify_payload(
        1,
        tasks,
        _vectors(k=2),
        dict.fromkeys(tasks, 5),
        "sum",
        "negative",
        True,
        True,
        "mean",
        bits=1,
        fraction=0.1,
        block=256,
    )
    blob = p.to_bytes()
    bad = corrupt(blob)
    with pytest.raises(PayloadError, match=message) as err:
        Payload.from_bytes(bad, max_length=10**6)
    assert len(str(err.value).splitlines()) == 1


def test_a_renamed_coded_vector_decodes_but_the_server_refuses_it():
    from matu_lib.server import UploadRejected, validate_upload

    tasks = ("a", "b")
    p = unify_payload(
        1,
        tasks,
        _vectors(k=2),
        dict.fromkeys(tasks, 5),
        "sum",
        "negative",
        True,
        True,
        "mean",
        bits=1,
        fraction=0.1,
        block=256,
    )
    back = Payload.from_bytes(_with_header(p.to_bytes(), b'"coded":{"unified"', b'"coded":{"model"'))
    with pytest.raises(UploadRejected, match="expected vectors"):
        validate_upload(back, 2000, set(tasks), {"unified"}, sender=1)


def test_coded_matu_run_counts_serialised_bytes_and_clients_use_what_they_received(ctx):
    sent = []

    def record(uploads):
        sent.append(sum(len(u.to_bytes()) for u in uploads))
        return uploads

    c = coded(ctx)
    res = run(c, "matu", tamper=record, log=quiet)
    assert [h["bytes_up"]["total"] for h in res.history] == sent  # counted = serialised, every round
    plain = run(ctx, "matu", log=quiet)
    assert res.history[0]["bytes_up"]["total"] < plain.history[0]["bytes_up"]["total"] / 8
    assert res.history[0]["bytes_down"]["total"] < plain.history[0]["bytes_down"]["total"] / 4
    for cl in c.clients:  # what a client trains from is what the received bytes decode to
        received = Payload.from_bytes(cl.download.to_bytes())
        for t in cl.tasks:
            assert torch.equal(payload_task_vector(received, t), cl.modulated(t))
    assert math.isfinite(res.final["mean_acc"])
    # the communication study evaluates coded runs at the last round only: the final numbers do not change
    last_only = run(coded(ctx, eval_every=c.cfg.rounds), "matu", log=quiet)
    assert last_only.final["acc"] == res.final["acc"] and "mean_acc" not in last_only.history[0]


@pytest.mark.parametrize("method", ["fedavg", "per_task_fedavg", "matfl_grouping"])
def test_fedavg_family_sends_coded_updates_and_the_server_adds_back_what_it_sent(ctx, method):
    c = coded(ctx, download_bits=32)
    m = METHODS[method](c)
    m.run_round(1, list(range(len(c.clients))))  # round 1 starts from zeros; round 2 from the download
    server, cl = m.server, c.clients[0]
    start = server.train_download(cl.client_id)
    upload = m.client_update(c.cfg, c.trainer, cl, 2, start)
    assert upload.coded and set(upload.coded) == set(upload.vectors)
    assert len(upload.to_bytes()) < 4 * c.trainer.n_params / 8  # 1 bit on a quarter of the entries, per vector
    (absorbed,) = server.absorb([upload])
    for name, v in absorbed.vectors.items():  # start + decoded update
        assert torch.equal(v, start.vectors[name] + upload.coded[name].decode())
        assert name in cl.residual  # what coding dropped stays with the client


def test_download_coding_makes_the_server_keep_what_clients_receive(ctx):
    c = coded(ctx, upload_bits=32, upload_topk=1.0, download_bits=1)
    m = METHODS["fedavg"](c)
    res = m.run_round(1, list(range(len(c.clients))))
    down = m.server.train_download(0)
    assert torch.equal(m.server.global_delta, m.server.codes["global"].decode())
    assert torch.equal(Payload.from_bytes(down.to_bytes()).vectors["model"], m.server.global_delta)
    assert res.bytes_down["vectors"] == len(c.clients) * m.server.codes["global"].nbytes


@pytest.mark.parametrize("method", ["matu", "per_task_fedavg"])
def test_coded_run_resumes_to_the_same_numbers(ctx, tmp_path, method):
    c = coded(ctx)
    full = run(c, method, tmp_path / "full", log=quiet)
    run(c, method, tmp_path / "resumed", stop_after=1, log=quiet)
    resumed = run(c, method, tmp_path / "resumed", resume=True, log=quiet)
    assert without_timings(resumed.history) == without_timings(full.history)


def test_top_k_keeps_the_largest_entries_and_zeroes_the_rest():
    v = torch.tensor([0.5, -2.0, 0.1, 3.0, -0.2, 1.0, 0.0, -0.7])
    c = encode(v, 32, 0.25)
    assert torch.equal(c.decode(), torch.tensor([0.0, -2.0, 0.0, 3.0, 0.0, 0.0, 0.0, 0.0]))
    assert c.support == 2
