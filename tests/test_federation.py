"""The federated runner: statelessness, determinism, resume, bad uploads, results folders, byte accounting."""

import dataclasses
import json
import math
from collections import Counter

import pytest
import torch

from matu_lib.aggregation import apply_transfer, similarity_matrix, transfer_weights
from matu_lib.client import matu_options
from matu_lib.communication import Payload, upload_formula_check
from matu_lib.comparison import compare
from matu_lib.data import get_task
from matu_lib.federation import build_context, run, summarise, without_timings
from matu_lib.presets import partition_for, preset
from matu_lib.server import MaTUServer, held_nbytes
from matu_lib.training import derive_seed


@pytest.fixture(scope="module")
def ctx():
    return build_context(preset("smoke", rounds=4, local_steps=3), log=lambda *_: None)


def quiet(*_):
    pass


# ------------------------------------------------------------------------------------- pure pieces


def test_payload_bytes_equal_serialised_bytes():
    g = torch.Generator().manual_seed(0)
    p = Payload(
        3,
        ("a", "b"),
        {"unified": torch.randn(1001, generator=g)},
        {"a": torch.rand(1001, generator=g) > 0.5, "b": torch.rand(1001, generator=g) > 0.2},
        {"a": 1.25, "b": 0.5},
        {"a": 10, "b": 7},
    )
    blob = p.to_bytes()
    parts = p.nbytes()
    assert parts["total"] == len(blob)
    assert parts["vectors"] == 4 * 1001 and parts["masks"] == 2 * 126 and parts["rescalers"] == 8
    back = Payload.from_bytes(blob)
    assert torch.equal(back.vectors["unified"], p.vectors["unified"])
    assert all(torch.equal(back.masks[t], p.masks[t]) for t in "ab")
    assert back.rescalers == p.rescalers and back.counts == p.counts and back.tasks == p.tasks
    with pytest.raises(ValueError, match="trailing bytes"):
        Payload.from_bytes(blob + b"x")


def test_summarise_normalises_with_chance_and_flags_an_unlearned_task():
    # mnist has 10 classes (chance 0.1), stripe_orientation 3 (chance 1/3); two clients hold mnist
    per_pair = {"0/mnist": 0.5, "1/mnist": 0.7, "1/stripe_orientation": 0.35}
    out = summarise(per_pair, {"mnist": 0.9, "stripe_orientation": 0.36})
    assert out["acc"] == pytest.approx({"mnist": 0.6, "stripe_orientation": 0.35})
    assert out["flagged"] == ["stripe_orientation"]  # 0.36 is 0.027 above chance, under the 0.05 margin
    assert out["normalised"]["mnist"] == pytest.approx(0.5 / 0.8)
    assert out["normalised"]["stripe_orientation"] == pytest.approx((0.35 - 1 / 3) / (0.36 - 1 / 3))
    assert out["mean_normalised"] == pytest.approx(0.625)  # the flagged task left out
    assert out["mean_ratio"] == pytest.approx(0.6 / 0.9)
    assert out["mean_ratio_all"] == pytest.approx((0.6 / 0.9 + 0.35 / 0.36) / 2)
    with pytest.raises(ValueError, match=r"no accuracy for tasks \['stripe_orientation'\]"):
        summarise(per_pair, {"mnist": 0.9})


def test_similarity_matrix_matches_naive_reference():
    g = torch.Generator().manual_seed(1)
    vecs = [torch.randn(50, generator=g) for _ in range(4)]
    vecs[3] = vecs[0] * 2
    cos = similarity_matrix(vecs, "cosine", chunk_size=7)
    sign = similarity_matrix(vecs, "sign", chunk_size=7)
    for i in range(4):
        for j in range(4):
            ref = torch.dot(vecs[i], vecs[j]) / (vecs[i].norm() * vecs[j].norm())
            assert cos[i, j] == pytest.approx(float(ref), abs=1e-5)
            assert sign[i, j] == pytest.approx(float((torch.sign(vecs[i]) * torch.sign(vecs[j])).mean()), abs=1e-6)
    assert cos[0, 3] == pytest.approx(1.0) and sign[0, 3] == pytest.approx(1.0)


def test_transfer_weights_keep_related_tasks_only():
    s = torch.tensor([[1.0, 0.5, -0.2], [0.5, 1.0, 0.0], [-0.2, 0.0, 1.0]])
    w = transfer_weights(s, temperature=0.1, threshold=0.1)
    assert torch.allclose(w.sum(1), torch.ones(3))
    assert w[0, 2] == 0 and w[1, 2] == 0 and w[2, 0] == 0 and w[2, 2] == 1
    assert w[0, 1] == pytest.approx(math.exp(5) / (math.exp(10) + math.exp(5)), rel=1e-5)
    vecs = [torch.ones(3), 2 * torch.ones(3), 3 * torch.ones(3)]
    out = apply_transfer(vecs, w)
    assert torch.allclose(out[2], vecs[2])
    assert torch.allclose(out[0], w[0, 0] * vecs[0] + w[0, 1] * vecs[1])
    assert all(torch.equal(a, b) for a, b in zip(apply_transfer(vecs, torch.eye(3)), vecs))


def test_presets_validate_and_refuse_unknown_keys():
    assert preset("cpu", rounds=2).rounds == 2
    with pytest.raises(TypeError, match="unknown config keys \\['roundz'\\]"):
        preset("cpu", roundz=2)
    with pytest.raises(ValueError, match="similarity must be one of"):
        preset("cpu", similarity="euclid")
    with pytest.raises(KeyError, match="unknown preset"):
        preset("laptop")
    with pytest.raises(ValueError, match="fill_dropped must be one of"):
        preset("cpu", fill_dropped="zeros")


def test_a_matu_only_option_names_matu_runs_only(tmp_path):
    """``fill_dropped`` changes MaTU's run and no other method's: a baseline's folder is reused, MaTU's refused."""
    from matu_lib.results_folder import folder_config

    off, on = preset("smoke", fill_dropped="none"), preset("smoke", fill_dropped="model")
    assert "fill_dropped" not in off.identity("matu")  # at its earlier value: runs written before it still match
    assert folder_config(on, "matu") != folder_config(off, "matu")
    assert folder_config(on, "matu")["fill_dropped"] == "model"
    for method in ("fedavg", "per_task_fedavg", "individual"):
        assert folder_config(on, method) == folder_config(off, method)
    assert folder_config(on, "fedavg") != folder_config(preset("smoke", fill_dropped="model", rounds=3), "fedavg")
    # a baseline saved with any value of a MaTU-only field (or before the field existed) is the same run; MaTU's is not
    from matu_lib.results_folder import same_run

    for method in ("fedavg", "matu"):
        new = folder_config(on, method)
        for saved in (
            {**new, "sketch_center": "none"},
            {k: v for k, v in new.items() if k != "sketch_center"},
            {**new, "fill_dropped": "start"},
        ):
            assert same_run(saved, new) == (method != "matu")
        assert same_run(new, new) and not same_run({**new, "rounds": 9}, new)


# ---------------------------------------------------------------------------------------- server


def _options(ctx, **overrides):
    """The MaTU options of ``ctx.cfg`` with ``overrides``: every option explicit, as the runner passes them."""
    return matu_options(dataclasses.replace(ctx.cfg, **overrides))


def _uploads(ctx, seed=0):
    opts = _options(ctx, error_feedback=False, sketch_bits=0)
    return [cl.matu_round(ctx.trainer, 2, seed, **opts) for cl in ctx.clients]


def test_server_is_stateless(ctx):
    uploads = _uploads(ctx)
    server = MaTUServer(transfer=True)
    first, info1 = server.aggregate(uploads)
    server.aggregate(_uploads(ctx, seed=5))  # another round in between must not matter
    again, info2 = server.aggregate(uploads)
    fresh, info3 = MaTUServer(transfer=True).aggregate(uploads)
    for k in first:
        for other in (again, fresh):
            assert torch.equal(first[k].vectors["unified"], other[k].vectors["unified"])
            assert all(torch.equal(first[k].masks[t], other[k].masks[t]) for t in first[k].masks)
            assert first[k].rescalers == other[k].rescalers
    assert info1 == info2 == info3
    assert held_nbytes(server) == 0 and vars(server) == vars(MaTUServer(transfer=True))
    sim = torch.tensor(info1["similarity"])
    assert torch.allclose(sim, sim.T) and torch.allclose(sim.diagonal(), torch.ones(len(sim)))


def test_held_nbytes_measures_what_an_object_holds():
    """Server state is a measurement: tensors, arrays and byte strings anywhere inside count, config does not."""
    import numpy as np

    class Holder:
        def __init__(self):
            self.cfg = {"rounds": 3, "name": "x"}
            self.vec = torch.zeros(10)  # 40 bytes
            self.per_client = {0: b"abc", 1: [torch.zeros(2, dtype=torch.float64)]}  # 3 + 16
            self.arr = np.zeros(4, dtype=np.int16)  # 8
            self.me = self  # a cycle ends
            self.skipped = torch.zeros(100)

    h = Holder()
    assert held_nbytes(h, skip={"skipped"}) == 40 + 3 + 16 + 8
    assert held_nbytes(h) == 40 + 3 + 16 + 8 + 400
    assert held_nbytes(MaTUServer()) == 0


# ------------------------------------------------------------------------------------------- runs


def test_same_seed_same_metrics(ctx):
    a = run(ctx, "matu", log=quiet)
    b = run(ctx, "matu", log=quiet)
    assert without_timings(a.history) == without_timings(b.history)
    assert a.final["server_state_bytes"] == 0
    # notebook 06's check, computed: measured upload minus metadata is MaTU's formula in every round
    tasks_of = {cl.client_id: cl.tasks for cl in ctx.clients}
    check = upload_formula_check(a.history, ctx.trainer.n_params, tasks_of, ctx.cfg.sketch_bits)
    assert check["ok"] and len(check["rounds"]) == ctx.cfg.rounds
    off_by_one = [{**h, "bytes_up": {**h["bytes_up"], "total": h["bytes_up"]["total"] + 1}} for h in a.history]
    assert not upload_formula_check(off_by_one, ctx.trainer.n_params, tasks_of, ctx.cfg.sketch_bits)["ok"]
    assert not upload_formula_check(a.history, ctx.trainer.n_params, tasks_of, 0)["ok"]  # sketches are counted


def test_error_feedback_carries_exactly_what_the_upload_dropped(ctx):
    from matu_lib.communication import payload_task_vector

    client = ctx.clients[0]
    client.download, client.residual = None, {}
    first = client.matu_round(ctx.trainer, 2, seed=0, **_options(ctx, error_feedback=True, sketch_bits=0))
    assert set(client.residual) == set(client.tasks)
    kept = dict(client.residual)
    # without feedback the same training gives these vectors; the upload must carry them plus the residual
    plain = [
        ctx.trainer.train_task(None, t, client.data[t], 2, derive_seed(1, client.client_id, t)) for t in client.tasks
    ]
    second = client.matu_round(ctx.trainer, 2, seed=1, **_options(ctx, error_feedback=True, sketch_bits=0))
    for t, v in zip(client.tasks, plain):
        intended = v + kept[t]
        assert torch.allclose(payload_task_vector(second, t) + client.residual[t], intended, atol=1e-6)
    assert any(float(e.abs().sum()) > 0 for e in kept.values())  # unification really dropped something
    assert first.tasks == second.tasks
    client.matu_round(ctx.trainer, 2, seed=0, **_options(ctx, error_feedback=False, sketch_bits=0))
    assert client.residual == {}  # off: no state is kept
    client.download, client.residual = None, {}


def test_centred_sketches_keep_the_raw_summed_updates_as_client_state(ctx):
    """Centring shapes what is sketched, never the running sums: centring sums of centred updates would compound."""
    from matu_lib.aggregation import centre_updates, sign_sketch

    client = ctx.clients[0]
    assert len(client.tasks) >= 2
    sketches, learned = {}, {}
    for centre in ("client", "none"):
        client.download, client.residual, client.learned = None, {}, {}
        ups = [
            client.matu_round(
                ctx.trainer, 2, seed=s, **_options(ctx, error_feedback=False, sketch_bits=512, sketch_center=centre)
            )
            for s in (0, 1)
        ]
        sketches[centre], learned[centre] = ups[-1].sketches, dict(client.learned)
    for t in client.tasks:  # same training either way: the sums are equal, only the sketches differ
        assert torch.equal(learned["client"][t], learned["none"][t])
        assert torch.equal(sketches["none"][t], sign_sketch(learned["none"][t], 512))
    centred = centre_updates(learned["client"])
    assert all(torch.equal(sketches["client"][t], sign_sketch(centred[t], 512)) for t in client.tasks)
    assert any(not torch.equal(sketches["client"][t], sketches["none"][t]) for t in client.tasks)
    client.download, client.residual, client.learned = None, {}, {}


def test_filled_takes_the_dropped_coordinates_from_the_kept_vector():
    """Hand-computed: the mask keeps coordinates 0 and 2 of the modulated vector; 1 and 3 come from the kept one."""
    from matu_lib.client import Client
    from matu_lib.modulators import pack_mask

    mask = torch.tensor([True, False, True, False])
    for sent in (mask, pack_mask(mask)):  # bool or packed as it travels: the same vectors
        down = Payload(0, ("a",), {"unified": torch.tensor([1.0, -2.0, 3.0, -4.0])}, {"a": sent}, {"a": 2.0}, {"a": 1})
        client = Client(0, {"a": (torch.zeros(1, 3, 8, 8), torch.zeros(1, dtype=torch.long))}, download=down)
        assert torch.equal(client.filled("a"), client.modulated("a"))  # nothing kept yet (round 1): no fill
        client.kept = {"a": torch.tensor([10.0, 20.0, 30.0, 40.0])}
        assert torch.equal(client.modulated("a"), torch.tensor([2.0, 0.0, 6.0, 0.0]))
        assert torch.equal(client.filled("a"), torch.tensor([2.0, 20.0, 6.0, 40.0]))
        assert torch.equal(client.model("a", "model"), client.filled("a"))
        assert torch.equal(client.model("a", "start"), client.modulated("a"))
        assert torch.equal(client.model("a", "none"), client.modulated("a"))


def test_fill_trains_from_the_filled_start_and_keeps_the_trained_vectors(ctx):
    client = ctx.clients[0]
    uploads, kept = {}, {}
    for fill in ("none", "model"):
        client.download, client.residual, client.kept = None, {}, {}
        first = client.matu_round(
            ctx.trainer, 2, seed=0, **_options(ctx, error_feedback=False, sketch_bits=0, fill_dropped=fill)
        )
        # round 1 starts from theta_0 either way: the same upload, and the trained vectors are kept only with a fill
        uploads[fill] = first.to_bytes()
        kept[fill] = dict(client.kept)
        client.download = Payload(
            client.client_id, client.tasks, first.vectors, first.masks, first.rescalers, first.counts
        )
    assert uploads["none"] == uploads["model"] and kept["none"] == {}
    plain = [
        ctx.trainer.train_task(None, t, client.data[t], 2, derive_seed(0, client.client_id, t)) for t in client.tasks
    ]
    assert all(torch.equal(kept["model"][t], v) for t, v in zip(client.tasks, plain))
    assert any(not bool(client.download.masks[t].all()) for t in client.tasks)  # something was dropped to fill
    starts = {t: client.filled(t) for t in client.tasks}
    second = client.matu_round(
        ctx.trainer, 2, seed=1, **_options(ctx, error_feedback=False, sketch_bits=0, fill_dropped="model")
    )
    expected = [
        ctx.trainer.train_task(starts[t], t, client.data[t], 2, derive_seed(1, client.client_id, t))
        for t in client.tasks
    ]
    assert all(torch.equal(client.kept[t], v) for t, v in zip(client.tasks, expected))
    assert second.tasks == client.tasks
    client.download, client.residual, client.kept = None, {}, {}


# The default MaTU run resumes every piece of client state (residuals, kept vectors); the runs without error
# feedback or without the fill hold a subset of it, so they run in `make test-all` only.
@pytest.mark.parametrize(
    "method,overrides",
    [
        ("matu", {}),
        pytest.param("matu", {"error_feedback": False}, marks=pytest.mark.long),
        pytest.param("matu", {"fill_dropped": "none"}, marks=pytest.mark.long),
        ("matu", {"sketch_source": "cumulative", "similarity": "sketch", "transfer": True}),  # client-held sums resume
        ("matfl_grouping", {}),
    ],
)
def test_resume_after_kill_matches_uninterrupted_run(ctx, tmp_path, method, overrides):
    ctx = dataclasses.replace(ctx, cfg=dataclasses.replace(ctx.cfg, **overrides))
    full = run(ctx, method, tmp_path / "full", log=quiet)
    part = run(ctx, method, tmp_path / "resumed", stop_after=2, log=quiet)
    assert len(part.history) == 2 and not part.final
    if method == "matu":  # the checkpoint holds residuals exactly when error feedback is on
        from safetensors import safe_open

        with safe_open(str(tmp_path / "resumed" / "checkpoint" / "checkpoint.safetensors"), framework="pt") as f:
            keys = list(f.keys())
            residuals = [k for k in keys if "/residual/" in k]
        assert bool(residuals) == ctx.cfg.error_feedback
        assert any("/kept/" in k for k in keys) == (ctx.cfg.fill_dropped != "none")  # fill's client state resumes
    resumed = run(ctx, method, tmp_path / "resumed", resume=True, log=quiet)
    assert without_timings(resumed.history) == without_timings(full.history)
    assert without_timings(resumed.final) == without_timings(full.final)
    saved = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    assert saved["final"]["mean_acc"] == full.final["mean_acc"]


def test_results_folder_is_never_silently_overwritten(ctx, tmp_path):
    ctx_cfg_run = run(ctx, "zero_shot", tmp_path / "zs", log=quiet)
    with pytest.raises(FileExistsError, match="resume=True"):
        run(ctx, "zero_shot", tmp_path / "zs", log=quiet)
    with pytest.raises(FileExistsError, match="different config"):
        run(ctx, "fedavg", tmp_path / "zs", resume=True, log=quiet)
    reused = run(ctx, "zero_shot", tmp_path / "zs", resume=True, log=quiet)
    assert reused.final == json.loads(json.dumps(ctx_cfg_run.final))
    run(ctx, "zero_shot", tmp_path / "zs", overwrite=True, log=quiet)
    assert len(list(tmp_path.glob("zs.*.bak"))) == 1  # the old results were moved aside, not deleted


@pytest.mark.parametrize(
    "fault, reason",
    [
        (lambda up: up.vectors["unified"].__setitem__(0, float("nan")), "NaN or Inf"),
        (lambda up: up.vectors.__setitem__("unified", up.vectors["unified"][:-3]), "has shape"),
        (lambda up: setattr(up, "tasks", up.tasks + ("no_such_task",)), "unknown task ids"),
        (lambda up: up.masks.__setitem__(up.tasks[0], up.masks[up.tasks[0]][:-1]), "mask of task"),
    ],
)
def test_bad_upload_is_rejected_and_round_goes_on(ctx, fault, reason):
    def tamper(uploads):
        fault(uploads[0])
        return uploads

    res = run(ctx, "matu", tamper=tamper, log=quiet)
    assert all(len(h["rejected"]) == 1 and reason in h["rejected"][0] for h in res.history)
    assert res.final["rejected_uploads"] == ctx.cfg.rounds
    assert math.isfinite(res.final["mean_acc"])
    # the other clients were aggregated and received downloads
    assert all(cl.download is not None for cl in ctx.clients[1:])


def test_upload_and_server_state_accounting(ctx):
    rows = {r["method"]: r for r in compare(ctx, ["individual", "matu", "per_task_fedavg", "fedavg"], log=quiet)}
    n = ctx.trainer.n_params
    pairs = sum(len(cl.tasks) for cl in ctx.clients)
    # per-task FedAvg uploads one dense vector per (client, task); MaTU one vector + 1-bit masks per client
    assert rows["per_task_fedavg"]["bytes_up_per_round"] > 4 * n * pairs
    sketch = math.ceil(ctx.cfg.sketch_bits / 8)  # one update sketch per task
    expected_matu = sum(4 * n + len(cl.tasks) * (math.ceil(n / 8) + 4 + sketch) for cl in ctx.clients)
    assert expected_matu < rows["matu"]["bytes_up_per_round"] < expected_matu + 2000  # + JSON headers
    assert rows["matu"]["server_state_bytes"] == 0
    assert rows["per_task_fedavg"]["server_state_bytes"] == 4 * n * len(ctx.tasks)
    assert rows["fedavg"]["server_state_bytes"] == 4 * n  # measured on the method object: its global vector
    assert rows["individual"]["mean_normalised"] == pytest.approx(1.0)


def test_compare_normalises_runs_reused_from_disk(ctx, tmp_path):
    run(ctx, "zero_shot", tmp_path / "zero_shot", log=quiet)  # finished earlier, without a reference
    rows = {r["method"]: r for r in compare(ctx, ["individual", "zero_shot"], tmp_path, log=quiet)}
    ref, zs = rows["individual"]["acc"], rows["zero_shot"]["acc"]
    chance = {t: 1 / len(get_task(t).classes) for t in ref}
    learned = [t for t in ref if ref[t] - chance[t] >= 0.05]  # the one-seed margin, stats.CHANCE_MARGIN
    assert rows["zero_shot"]["flagged"] == sorted(set(ref) - set(learned))
    norm = [(zs[t] - chance[t]) / (ref[t] - chance[t]) for t in learned]
    assert rows["zero_shot"]["mean_normalised"] == pytest.approx(sum(norm) / len(norm))
    assert rows["zero_shot"]["mean_ratio"] == pytest.approx(sum(zs[t] / ref[t] for t in learned) / len(learned))
    assert rows["zero_shot"]["mean_ratio_all"] == pytest.approx(sum(zs[t] / ref[t] for t in ref) / len(ref))
    assert rows["zero_shot"]["chance"] == pytest.approx(chance)  # from the heads: one row per class


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cpu_tasks_form_five_families_spread_over_clients(seed):
    """The similarity lesson needs families: 5 or more of 2 or more tasks, each task on several clients, and no
    client holding two tasks of one family (related tasks meet only at the server)."""
    cfg = preset("cpu", seed=seed)
    families = {t: get_task(t).family for t in cfg.tasks}
    sizes = Counter(families.values())
    assert len(sizes) >= 5 and min(sizes.values()) >= 2
    sizes_train = {t: min(get_task(t).n_train, cfg.max_train_per_task) for t in cfg.tasks}
    manifest = partition_for(cfg, sizes_train)
    for t in cfg.tasks:
        assert len(manifest.clients_of(t)) >= cfg.min_clients_per_task
    for c in range(cfg.n_clients):
        held = [families[s.task] for s in manifest.shards if s.client_id == c]
        assert len(held) == len(set(held))
