"""Fault suite: hostile bytes, hostile uploads, killed runs, corrupted folders and mistyped parameters.

Every bad input must end as a valid result, a named rejection with the round going on, or one clear line;
never a crash of the round, a traceback from deep inside, or a silently different number.
``TALLY`` counts the bad inputs tried per class; run with ``-s`` to print it.
"""

from __future__ import annotations

import errno
import json
import math
import struct
import tracemalloc
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from matu_lib import results_folder
from matu_lib.communication import MAX_SKETCH_BITS, Payload, PayloadError, unify_payload
from matu_lib.federation import build_context, run, without_timings
from matu_lib.presets import preset
from matu_lib.results_folder import CheckpointError
from matu_lib.server import MAX_SAMPLES, MaTUServer, UploadRejected, screen_uploads, validate_upload

TALLY: Counter = Counter()
# derandomized: the same examples on every run and machine (a failure reproduces); no example database on disk
FAST = settings(
    max_examples=150, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)


@pytest.fixture(scope="module", autouse=True)
def _print_tally():
    yield
    print("\nfault-suite bad inputs tried:", dict(TALLY), "total", sum(TALLY.values()))


def _payload(
    k: int = 1, n: int = 40, tasks=("a", "b"), seed: int = 0, sketch: bool = True, coding: tuple[int, float] = (32, 1.0)
) -> Payload:
    g = torch.Generator().manual_seed(seed)
    vecs = [torch.randn(n, generator=g) * 0.01 for _ in tasks]
    up = unify_payload(
        k,
        tasks,
        vecs,
        {t: 10 + i for i, t in enumerate(tasks)},
        "sum",
        "negative",
        True,
        True,
        "mean",
        bits=coding[0],
        fraction=coding[1],
        block=16,
    )
    if sketch:
        up.sketches = {tasks[0]: torch.rand(300, generator=g) > 0.5}
    return up


def _decode(blob) -> Payload | None:
    """The decoder's contract: a Payload or one PayloadError whose message is a single line."""
    try:
        return Payload.from_bytes(blob)
    except PayloadError as err:
        assert "\n" not in str(err) and str(err)
        return None


# ------------------------------------------------------------------------------------------- decoder


def test_round_trip_with_sketches_and_byte_accounting():
    p = _payload()
    blob = p.to_bytes()
    assert p.nbytes()["total"] == len(blob) and p.nbytes()["sketches"] == math.ceil(300 / 8)
    q = Payload.from_bytes(blob)
    assert torch.equal(q.sketches["a"], p.sketches["a"]) and torch.equal(q.vectors["unified"], p.vectors["unified"])
    assert q.counts == p.counts and q.rescalers == pytest.approx(p.rescalers) and q.tasks == p.tasks
    plain = _payload(sketch=False).to_bytes()
    (n,) = struct.unpack_from("<Q", plain)
    assert "sketches" not in json.loads(plain[8 : 8 + n])  # payloads without sketches keep their byte counts


@FAST
@given(st.binary(max_size=400))
def test_fuzz_arbitrary_bytes(blob):
    TALLY["decoder: arbitrary bytes"] += 1
    _decode(blob)


@FAST
@given(st.data())
def test_fuzz_mutated_valid_blob(data):
    coding = data.draw(st.sampled_from([(32, 1.0), (1, 0.25), (4, 1.0), (8, 0.5)]))  # float32 and coded vectors
    blob = bytearray(_payload(seed=data.draw(st.integers(0, 3)), coding=coding).to_bytes())
    kind = data.draw(st.sampled_from(["flip", "truncate", "extend"]))
    TALLY[f"decoder: {kind}"] += 1
    if kind == "flip":
        for _ in range(data.draw(st.integers(1, 4))):
            blob[data.draw(st.integers(0, len(blob) - 1))] ^= 1 << data.draw(st.integers(0, 7))
        _decode(bytes(blob))
    elif kind == "truncate":  # a truncated payload can never decode
        assert _decode(bytes(blob[: data.draw(st.integers(0, len(blob) - 1))])) is None
    else:
        assert _decode(bytes(blob) + data.draw(st.binary(min_size=1, max_size=20))) is None


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=8,
)


def _with_header(header: dict, body: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


@FAST
@given(
    st.sampled_from(["client", "tasks", "counts", "vectors", "masks", "rescalers", "sketches", "coded", "extra"]), JSON
)
def test_fuzz_header_field_types(key, value):
    """Any JSON value in any header field: a valid payload or one PayloadError (no TypeError/KeyError/...)."""
    TALLY["decoder: header field of random type"] += 1
    p = _payload(coding=(1, 0.25))
    blob = p.to_bytes()
    (n,) = struct.unpack_from("<Q", blob)
    header = json.loads(blob[8 : 8 + n])
    header[key] = value
    _decode(_with_header(header, blob[8 + n :]))


@pytest.mark.parametrize(
    "header, reason",
    [
        (
            {"client": 1, "tasks": ["a"], "counts": {"a": float("nan")}, "vectors": {}, "masks": {}, "rescalers": []},
            "finite",
        ),
        ({"client": 1, "tasks": ["a"], "counts": {"a": 1e300}, "vectors": {}, "masks": {}, "rescalers": []}, "integer"),
        (
            {"client": 1, "tasks": ["a", "a"], "counts": {}, "vectors": {}, "masks": {}, "rescalers": []},
            "duplicate task",
        ),
        ({"client": True, "tasks": [], "counts": {}, "vectors": {}, "masks": {}, "rescalers": []}, "'client'"),
        ({"client": 1, "tasks": [3], "counts": {}, "vectors": {}, "masks": {}, "rescalers": []}, "task id"),
        (
            {"client": 1, "tasks": ["a"], "counts": {"b": 3}, "vectors": {}, "masks": {}, "rescalers": []},
            "not in the payload",
        ),
        (
            {
                "client": 1,
                "tasks": ["a"],
                "counts": {},
                "vectors": {},
                "masks": {},
                "rescalers": [],
                "sketches": {"a": MAX_SKETCH_BITS + 1},
            },
            "sketches",
        ),
        ({"client": 1, "tasks": ["a"], "counts": {}, "vectors": {}, "masks": {"a": -1}, "rescalers": []}, "length"),
        ({"client": 1, "tasks": ["a"], "counts": {}, "vectors": {"v": 4}}, "missing keys"),
    ],
)
def test_bad_header_is_one_named_error(header, reason):
    TALLY["decoder: named header fault"] += 1
    with pytest.raises(PayloadError, match=reason):
        Payload.from_bytes(_with_header(header, b""))


def test_deep_nesting_and_duplicate_keys_are_payload_errors():
    TALLY["decoder: named header fault"] += 2
    with pytest.raises(PayloadError, match="nested too deeply|not valid JSON"):
        Payload.from_bytes(struct.pack("<Q", 200_000) + b"[" * 100_000 + b"]" * 100_000)
    text = b'{"client":1,"client":2,"tasks":[],"counts":{},"vectors":{},"masks":{},"rescalers":[]}'
    with pytest.raises(PayloadError, match="repeats keys"):
        Payload.from_bytes(struct.pack("<Q", len(text)) + text)


def test_huge_declared_mask_is_refused_before_allocating():
    """A 10 kB upload declaring an 80-million-entry mask must fail on the length check, not allocate 80 MB."""
    TALLY["decoder: oversized declaration"] += 1
    header = {
        "client": 1,
        "tasks": ["a"],
        "counts": {"a": 1},
        "vectors": {},
        "masks": {"a": 80_000_000},
        "rescalers": [],
    }
    blob = _with_header(header, b"\x00" * 10_000)
    tracemalloc.start()
    with pytest.raises(PayloadError, match="missing bytes|length"):
        Payload.from_bytes(blob)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1_000_000, f"decoder allocated {peak} bytes for a refused payload"


# -------------------------------------------------------------------------------------------- server

N = 40
KNOWN = {"a", "b", "c"}
HOLDS = {0: {"a", "b"}, 1: {"a", "b"}, 2: {"b", "c"}}


def _corrupt(up: Payload, kind: str, value=None) -> Payload:
    """``up`` with one field made hostile (``kind``); ``value`` parametrises numeric faults."""
    if kind == "count":
        up.counts[up.tasks[0]] = value
    elif kind == "extra_count":
        up.counts["c"] = 10**9
    elif kind == "claim":
        up.client_id = value
    elif kind == "no_tasks":
        up.tasks = ()
    elif kind == "dup_tasks":
        up.tasks = up.tasks + up.tasks[:1]
    elif kind == "foreign_task":
        up.tasks, up.counts = up.tasks + ("c",), {**up.counts, "c": 5}
    elif kind == "unknown_task":
        up.tasks, up.counts = up.tasks + ("zz",), {**up.counts, "zz": 5}
    elif kind == "vector_value":
        up.vectors["unified"][3] = value
    elif kind == "rescaler":
        up.rescalers[up.tasks[0]] = value
    elif kind == "mask_dtype":
        up.masks[up.tasks[0]] = up.masks[up.tasks[0]].to(torch.uint8)
    elif kind == "sketch_foreign":
        up.sketches["c"] = torch.zeros(8, dtype=torch.bool)
    elif kind == "counts_not_dict":
        up.counts = [10, 11]
    return up


HOSTILE = st.one_of(
    st.tuples(
        st.just("count"),
        st.sampled_from(
            [float("nan"), float("inf"), -float("inf"), 1e300, 0, -3, 2.5, True, MAX_SAMPLES + 1, "7", None]
        ),
    ),
    st.tuples(st.just("count"), st.integers(max_value=0) | st.integers(min_value=MAX_SAMPLES + 1)),
    st.tuples(st.just("claim"), st.integers(-5, 5).filter(lambda k: k != 1) | st.just(True) | st.just("1")),
    st.tuples(st.just("vector_value"), st.sampled_from([float("nan"), float("inf"), 1e7, -1e30])),
    st.tuples(st.just("rescaler"), st.sampled_from([float("nan"), float("inf"), 1e9, "x", None])),
    st.tuples(
        st.sampled_from(
            [
                "extra_count",
                "no_tasks",
                "dup_tasks",
                "foreign_task",
                "unknown_task",
                "mask_dtype",
                "sketch_foreign",
                "counts_not_dict",
            ]
        ),
        st.none(),
    ),
)


@settings(FAST, max_examples=200)
@given(HOSTILE, st.integers(0, 5))
def test_fuzz_hostile_upload_is_rejected_by_name_and_round_goes_on(fault, seed):
    """Client 1's upload is hostile; clients 0 and 2 are honest. Client 1 is rejected by name, 0 and 2 are
    aggregated into finite downloads assigned to the senders."""
    kind, value = fault
    TALLY[f"server: {kind}"] += 1
    ups = [
        _payload(0, N, ("a", "b"), seed),
        _corrupt(_payload(1, N, ("a", "b"), seed + 1), kind, value),
        _payload(2, N, ("b", "c"), seed + 2),
    ]
    accepted, rejected = screen_uploads(ups, N, KNOWN, {"unified"}, senders=[0, 1, 2], holdings=HOLDS)
    assert [u.client_id for u in accepted] == [0, 2]
    assert len(rejected) == 1 and rejected[0].startswith("client 1:") and "\n" not in rejected[0]
    downloads, _ = MaTUServer(magnitude="mean").aggregate(accepted)
    assert sorted(downloads) == [0, 2] and all(torch.isfinite(d.vectors["unified"]).all() for d in downloads.values())


@settings(FAST, max_examples=100)
@given(
    st.integers(1, MAX_SAMPLES),
    st.integers(1, MAX_SAMPLES),
    st.floats(-1e6, 1e6, allow_nan=False),
    st.floats(1e-3, 1e6, allow_nan=False),
)
def test_fuzz_extreme_but_valid_uploads_aggregate_without_overflow(n0, n1, value, scale):
    """Counts and values at the accepted bounds: weighted sums stay finite (the bounds make overflow impossible)."""
    TALLY["server: extreme valid values"] += 1
    ups = [_payload(0, N, ("a", "b"), 0), _payload(1, N, ("a", "b"), 1)]
    ups[0].counts = {"a": n0, "b": n1}
    ups[1].vectors["unified"][:] = value
    ups[1].rescalers = {"a": scale, "b": scale}
    accepted, rejected = screen_uploads(ups, N, KNOWN, {"unified"}, senders=[0, 1], holdings=HOLDS)
    assert not rejected
    downloads, _ = MaTUServer(magnitude="mean").aggregate(accepted)
    assert all(torch.isfinite(d.vectors["unified"]).all() for d in downloads.values())


def test_duplicate_sender_and_validate_names_sender_not_claim():
    TALLY["server: duplicate sender"] += 1
    ups = [_payload(0), _payload(0, seed=3)]
    accepted, rejected = screen_uploads(ups, N, KNOWN, {"unified"}, senders=[0, 0], holdings=HOLDS)
    assert len(accepted) == 1 and "more than one upload" in rejected[0]
    with pytest.raises(UploadRejected, match=r"^client 2: upload claims to come from client 0"):
        validate_upload(_payload(0), N, KNOWN, {"unified"}, sender=2)


# ------------------------------------------------------------------------------- in-process rounds

TINY = dict(model="matu-micro", pretrained=None, rounds=2, local_steps=1, max_train_per_task=64, eval_batch_size=256)


@pytest.fixture(scope="module")
def ctx():
    return build_context(preset("smoke", **TINY), log=lambda *_: None)


def quiet(*_):
    pass


def test_malicious_clients_in_process_round(ctx):
    """Client 0 speaks for client 1 and client 2 sends a NaN count: both rejected by name, the round goes on,
    and client 1 gets the download built from its own upload (downloads follow the sender, not the claim)."""
    TALLY["in-process round: malicious client"] += 2

    def tamper(uploads):
        forged = _payload(1, ctx.trainer.n_params, tuple(ctx.clients[1].tasks), 9, sketch=False)
        uploads[0] = forged
        uploads[2].counts[uploads[2].tasks[0]] = float("nan")
        return uploads

    res = run(ctx, "matu", tamper=tamper, log=quiet)
    for h in res.history:
        assert len(h["rejected"]) == 2
        assert h["rejected"][0].startswith("client 0: upload claims to come from client 1")
        assert h["rejected"][1].startswith("client 2: sample count")
    assert math.isfinite(res.final["mean_acc"]) and ctx.clients[1].download is not None
    assert ctx.clients[0].download is None and ctx.clients[2].download is None


def test_fedavg_weight_cannot_be_inflated_by_counts_for_tasks_not_held(ctx):
    TALLY["in-process round: malicious client"] += 1
    other = next(t for t in ctx.tasks if t not in ctx.clients[0].tasks)

    def tamper(uploads):
        uploads[0].counts[other] = 10**9
        return uploads

    res = run(ctx, "fedavg", tamper=tamper, log=quiet)
    assert all(len(h["rejected"]) == 1 and h["rejected"][0].startswith("client 0:") for h in res.history)


# ------------------------------------------------------------------------------- kill and resume


class SimulatedKill(BaseException):
    """Raised from the checkpoint hook: like a kill, no ``except Exception`` in the runner catches it."""


STEPS = ("metrics.jsonl", "checkpoint", "commit")
KILL_POINTS = [(step, r) for r in (1, 2) for step in STEPS] + [("metrics.json", 1)]  # (step, occurrence)


@pytest.fixture(scope="module")
def uninterrupted(ctx, tmp_path_factory):
    folder = tmp_path_factory.mktemp("clean") / "matu"
    res = run(ctx, "matu", folder, log=quiet)
    return res, (folder / "metrics.jsonl").read_text().splitlines()


@pytest.mark.parametrize("step, at_round", KILL_POINTS)
def test_kill_at_each_checkpoint_step_then_resume_is_exact(ctx, uninterrupted, tmp_path, monkeypatch, step, at_round):
    TALLY["kill at a checkpointing step"] += 1
    seen = Counter()

    def hook(name):
        seen[name] += 1
        if name == step and seen[name] == at_round:
            raise SimulatedKill(f"{name} #{at_round}")

    monkeypatch.setattr(results_folder, "CHECKPOINT_HOOK", hook)
    with pytest.raises(SimulatedKill):
        run(ctx, "matu", tmp_path / "matu", log=quiet)
    monkeypatch.setattr(results_folder, "CHECKPOINT_HOOK", None)
    resumed = run(ctx, "matu", tmp_path / "matu", resume=True, log=quiet)
    clean, clean_lines = uninterrupted
    assert without_timings(resumed.history) == without_timings(json.loads(json.dumps(clean.history)))
    assert without_timings(resumed.final) == without_timings(clean.final)
    lines = (tmp_path / "matu" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["round"] for x in lines] == [1, 2]  # no duplicate or missing round
    assert [without_timings(json.loads(x)) for x in lines] == [without_timings(json.loads(x)) for x in clean_lines]


# ------------------------------------------------------------------------------------ corruption


@pytest.fixture()
def stopped_run(ctx, tmp_path):
    """A run stopped after round 1: a folder with a checkpoint to corrupt."""
    run(ctx, "matu", tmp_path / "matu", stop_after=1, log=quiet)
    return tmp_path / "matu"


def _flip(path: Path, offset_from_end: int) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flip_tensor_byte", "flip_header_byte", "truncate", "empty", "garbage"])
def test_corrupt_checkpoint_is_one_line_naming_the_fix(ctx, stopped_run, damage):
    TALLY["corrupt checkpoint"] += 1
    path = stopped_run / "checkpoint" / results_folder.CHECKPOINT_FILE
    if damage == "flip_tensor_byte":
        _flip(path, 7)
    elif damage == "flip_header_byte":
        data = bytearray(path.read_bytes())
        data[data.index(b"mean_acc") + 1] ^= 0x01  # a key in the stored history: still JSON, hash mismatch
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:-100])
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        path.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="--overwrite") as err:
        run(ctx, "matu", stopped_run, resume=True, log=quiet)
    assert "\n" not in str(err.value)
    run(ctx, "matu", stopped_run, overwrite=True, stop_after=1, log=quiet)  # the named fix works


@pytest.mark.parametrize("target", ["config.json", "metrics.json"])
def test_corrupt_results_files_are_one_line(ctx, tmp_path, target):
    TALLY["corrupt results file"] += 1
    folder = tmp_path / "zs"
    run(ctx, "zero_shot", folder, log=quiet)
    (folder / target).write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        run(ctx, "zero_shot", folder, resume=True, log=quiet)


def test_corrupt_cache_entry_is_rebuilt_never_used(tmp_path, monkeypatch):
    from matu_lib.data import suite

    TALLY["corrupt data cache"] += 2
    clean = suite.load_task("sklearn_digits", tmp_path)
    path = suite.cache_path("sklearn_digits", tmp_path, 0)
    # flip a byte in the tensor data (the last tensor in the file): labels/images change, shapes do not
    _flip(path, 3)
    with pytest.warns(UserWarning, match="corrupt"):
        again = suite.load_task("sklearn_digits", tmp_path)
    for split in suite.SPLITS:
        assert all(torch.equal(a, b) for a, b in zip(again.split(split), clean.split(split)))
    assert suite._read_cache(path, clean.spec, 0) is not None  # rewritten with a valid hash
    # a corrupt entry that cannot be rewritten is one line saying what to do, never used
    _flip(path, 3)
    monkeypatch.setattr(suite.tempfile, "mkstemp", lambda **_: (_ for _ in ()).throw(PermissionError(13, "denied")))
    with pytest.warns(UserWarning), pytest.raises(suite.CacheCorrupt, match="delete it"):
        suite.load_task("sklearn_digits", tmp_path)


def _disk_full_writer(tensors, filename, metadata=None):
    """A safetensors writer on a full disk: part of the file is written, then ENOSPC."""
    Path(filename).write_bytes(b"\0" * 100)
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_during_a_checkpoint_is_one_line_and_keeps_the_last_checkpoint(ctx, stopped_run, monkeypatch):
    import safetensors.torch

    TALLY["disk full"] += 1
    monkeypatch.setattr(safetensors.torch, "save_file", _disk_full_writer)
    with pytest.raises(results_folder.DiskFull) as err:
        run(ctx, "matu", stopped_run, resume=True, log=quiet)
    path = stopped_run / "checkpoint" / results_folder.CHECKPOINT_FILE
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "MiB" in message and "still holds round 1" in message
    assert results_folder.checkpoint_rounds(stopped_run) == 1 and not list(path.parent.glob("*.tmp"))
    monkeypatch.undo()
    assert run(ctx, "matu", stopped_run, resume=True, log=quiet).final["rounds"] == 2  # the last checkpoint resumes


def test_disk_full_during_a_data_cache_write_is_one_line(tmp_path, monkeypatch):
    import safetensors.torch

    from matu_lib.data import suite

    TALLY["disk full"] += 1
    monkeypatch.setattr(safetensors.torch, "save_file", _disk_full_writer)
    with pytest.raises(OSError, match="disk full") as err:
        suite.load_task("sklearn_digits", tmp_path)
    assert "\n" not in str(err.value) and str(suite.cache_path("sklearn_digits", tmp_path, 0)) in str(err.value)
    assert "MiB" in str(err.value) and "MATU_DATA_DIR" in str(err.value) and not list(tmp_path.iterdir())


# --------------------------------------------------------------------------------------------- CLI


def _cli(args: list[str], capsys) -> tuple[int, str]:
    from matu_lib.__main__ import main

    rc = main(args)
    return rc, capsys.readouterr().err.strip()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "rounds=2.5"], "rounds must be an integer, got 2.5"),
        (["--set", "transfer=maybe"], "transfer must be true or false"),
        (["--set", "lr=nan"], "lr must be a finite number"),
        (["--set", "nope=1"], "unknown config keys ['nope']"),
        (["--set", "rounds"], "--set expects key=value"),
        (["--set", "tasks=mnst"], "unknown tasks ['mnst']"),
        (["--method", "nope"], "unknown methods ['nope']"),
        (["--preset", "nope"], "unknown preset"),
    ],
)
def test_cli_refuses_bad_parameters_before_any_work(args, message, tmp_path, capsys, monkeypatch):
    TALLY["CLI parameter"] += 1
    import matu_lib.comparison as cmp
    import matu_lib.federation as fed

    for module in (fed, cmp):
        monkeypatch.setattr(module, "build_context", lambda *a, **k: pytest.fail("work started before validation"))
    out = tmp_path / "out"
    rc, err = _cli(["run", "--preset", "smoke", "--out", str(out), *args], capsys)
    assert rc == 2 and message in err and "\n" not in err
    assert not out.exists()  # nothing written


def test_cli_compare_refuses_unknown_method_and_out_file(tmp_path, capsys, monkeypatch):
    TALLY["CLI parameter"] += 2
    import matu_lib.comparison as cmp
    import matu_lib.federation as fed

    for module in (fed, cmp):
        monkeypatch.setattr(module, "build_context", lambda *a, **k: pytest.fail("work started before validation"))
    rc, err = _cli(["compare", "--preset", "smoke", "--methods", "matu", "nope", "--out", str(tmp_path)], capsys)
    assert rc == 2 and "unknown methods ['nope']" in err
    (tmp_path / "file").write_text("x")
    rc, err = _cli(["run", "--preset", "smoke", "--out", str(tmp_path / "file")], capsys)
    assert rc == 2 and "is a file" in err and "\n" not in err


TINY_SET = [f"--set={k}={'none' if v is None else v}" for k, v in TINY.items()]


def test_ctrl_c_during_a_cli_run_is_one_line_exit_130_and_the_same_command_resumes(tmp_path, capsys, monkeypatch):
    TALLY["Ctrl-C"] += 1
    seen = Counter()

    def hook(name):
        seen[name] += 1
        if name == "metrics.jsonl" and seen[name] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(results_folder, "CHECKPOINT_HOOK", hook)
    argv = ["run", "--preset", "smoke", "--out", str(tmp_path / "matu"), *TINY_SET]
    rc, err = _cli(argv, capsys)
    assert rc == 130 and err == (
        f"interrupted: matu stopped in {tmp_path / 'matu'} after round 1 (its checkpoint is whole); "
        "rerun the same command to resume"
    )
    assert results_folder.checkpoint_rounds(tmp_path / "matu") == 1
    monkeypatch.setattr(results_folder, "CHECKPOINT_HOOK", None)
    rc, err = _cli(argv, capsys)
    assert rc == 0 and json.loads((tmp_path / "matu" / "metrics.json").read_text())["final"]["rounds"] == 2


def test_ctrl_c_during_a_cli_compare_is_one_line_exit_130(tmp_path, capsys, monkeypatch):
    TALLY["Ctrl-C"] += 1

    def hook(name):
        raise KeyboardInterrupt

    monkeypatch.setattr(results_folder, "CHECKPOINT_HOOK", hook)
    rc, err = _cli(["compare", "--preset", "smoke", "--methods", "matu", "--out", str(tmp_path), *TINY_SET], capsys)
    assert rc == 130 and err == (
        f"interrupted: finished runs and the last whole round of the one in progress are kept under {tmp_path}; "
        "rerun the same command to resume"
    )


def test_cli_refuses_a_corrupt_config_json_in_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    import matu_lib.federation as fed

    TALLY["corrupt results file"] += 1
    monkeypatch.setattr(fed, "build_context", lambda *a, **k: pytest.fail("work started before the folder check"))
    (tmp_path / "matu").mkdir()
    (tmp_path / "matu" / "config.json").write_text('{"meth')
    rc, err = _cli(["run", "--preset", "smoke", "--out", str(tmp_path / "matu")], capsys)
    folder = tmp_path / "matu"
    assert rc == 2 and err == f"error: {folder}/config.json is corrupt; rerun with --overwrite to move {folder} aside"


def test_set_tasks_single_name_is_one_task():
    from matu_lib.presets import parse_overrides

    assert preset("smoke", **parse_overrides(["tasks=mnist"])).tasks == ("mnist",)
    assert preset("smoke", **parse_overrides(["tasks=mnist,textures"])).tasks == ("mnist", "textures")


# ------------------------------------------------------------------------------------------ Flower


def _reply(node: int, content=None, error: str | None = None):
    """A stand-in for a Flower reply: the strategy reads only these attributes."""
    return SimpleNamespace(
        metadata=SimpleNamespace(src_node_id=node),
        content=content or {},
        has_error=lambda: error is not None,
        error=SimpleNamespace(reason=error),
    )


def test_flower_strategy_rejects_each_malformed_reply_and_aggregates_the_rest(monkeypatch):
    pytest.importorskip("flwr")
    from flwr.app import ConfigRecord

    from matu_lib.flower import strategy
    from matu_lib.flower.strategy import MethodStrategy, payload_record

    # outside a Flower run a Message cannot be built: a stand-in with the attributes the test reads
    monkeypatch.setattr(
        strategy,
        "Message",
        lambda content, dst, kind: SimpleNamespace(
            content=content, metadata=SimpleNamespace(dst_node_id=dst), message_type=kind
        ),
    )

    cfg = preset("smoke", model="matu-micro", pretrained=None, n_clients=8, tasks=("a", "b", "c"))
    holdings = {k: {"a", "b"} for k in range(8)}
    strat = MethodStrategy(cfg, "matu", n_params=N, tasks=KNOWN, holdings=holdings)
    strat.node_of = {k: 100 + k for k in range(8)}
    strat._entry = {"round": 1, "sampled": list(range(8)), "bytes_up": {}, "bytes_down": {}, "rejected": []}
    good = _payload(0, N).to_bytes()
    replies = [
        _reply(100, {"upload": payload_record(good)}),
        _reply(101, {"upload": payload_record(b"\x00garbage" * 9)}),
        _reply(102, {"upload": payload_record(_payload(2, N).to_bytes()[:-5])}),
        _reply(103, {"upload": ConfigRecord({"payload": "x"})}),
        _reply(104, {"metrics": {}}),
        _reply(105, error="ClientApp crashed"),
        _reply(106, {"upload": payload_record(_payload(5, N).to_bytes())}),  # claims client 5
        _reply(999, {"upload": payload_record(_payload(7, N).to_bytes())}),  # unknown node
        _reply(107, {"upload": payload_record(_payload(7, N).to_bytes())}),
    ]
    TALLY["Flower: malformed reply (unit)"] += 7
    strat.aggregate_train(1, replies)
    rejected = strat._entry["rejected"]
    assert len(rejected) == 7 and all("\n" not in r for r in rejected)
    for who in ("client 1 ", "client 2 ", "client 3 ", "client 4 ", "client 5 ", "client 6", "node 999"):
        assert any(r.startswith(who) or who in r for r in rejected), who
    assert sorted(strat.pending) == [0, 7]
    # the downloads leave in this round's evaluate messages; then the strategy holds nothing about a client
    held = strat.server_state_nbytes()
    assert held >= sum(len(b) for b in strat.pending.values())
    messages = list(strat.configure_evaluate(1, None, None, None))
    assert sorted(m.metadata.dst_node_id for m in messages if "download" in m.content) == [100, 107]
    assert strat.pending == {} and strat.server_state_nbytes() == 0


def test_flower_strategy_writes_downloads_over_the_uploads_it_decoded(monkeypatch):
    """The strategy owns the uploads it decodes, so MaTU's round writes the downloads over them
    (``consume=True``): the downloads it sends are byte for byte those of a round into new buffers."""
    pytest.importorskip("flwr")
    from matu_lib import server as srv
    from matu_lib.flower import strategy
    from matu_lib.flower.strategy import MethodStrategy, payload_record

    monkeypatch.setattr(
        strategy,
        "Message",
        lambda content, dst, kind: SimpleNamespace(
            content=content, metadata=SimpleNamespace(dst_node_id=dst), message_type=kind
        ),
    )
    cfg = preset("smoke", model="matu-micro", pretrained=None, n_clients=3, tasks=("a", "b", "c"))
    held = {0: ("a", "b"), 1: ("b", "c"), 2: ("a", "c")}
    strat = MethodStrategy(cfg, "matu", n_params=N, tasks=KNOWN, holdings=held)
    strat.node_of = {k: 100 + k for k in held}
    strat._entry = {"round": 1, "sampled": list(held), "bytes_up": {}, "bytes_down": {}, "rejected": []}
    blobs = {k: _payload(k, N, tasks=ts, seed=k).to_bytes() for k, ts in held.items()}
    calls, aggregate = [], srv.MaTUServer.aggregate

    def spy(self, uploads, consume=False):
        calls.append(consume)
        return aggregate(self, uploads, consume=consume)

    monkeypatch.setattr(srv.MaTUServer, "aggregate", spy)
    strat.aggregate_train(1, [_reply(100 + k, {"upload": payload_record(b)}) for k, b in blobs.items()])
    assert calls == [True] and strat._entry["rejected"] == []
    fresh, _ = aggregate(strat.server.matu, [Payload.from_bytes(b) for b in blobs.values()])
    assert strat.pending == {k: d.to_bytes() for k, d in fresh.items()}


@pytest.mark.long
def test_flower_round_with_malicious_nodes_goes_on(tmp_path, monkeypatch):
    """A real Flower simulation (1 round): node 0 sends garbage bytes, node 2 a forged client id."""
    pytest.importorskip("ray")
    from matu_lib.flower import run_flower

    TALLY["Flower: malicious node (simulation)"] += 2
    monkeypatch.setenv("MATU_FAULTY_UPLOADS", "0:garbage,2:claim")
    res = run_flower(preset("smoke", **{**TINY, "rounds": 1}), "matu", out=tmp_path / "fl", log=quiet)
    rejected = res.history[0]["rejected"]
    assert len(rejected) == 2 and rejected[0].startswith("client 0") and rejected[1].startswith("client 2")
    assert math.isfinite(res.final["mean_acc"])
    again = run_flower(preset("smoke", **{**TINY, "rounds": 1}), "matu", out=tmp_path / "fl", resume=True, log=quiet)
    assert again.flower.get("reused") and again.final == res.final  # a finished Flower folder is reusable
