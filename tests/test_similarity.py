"""The server's task similarity from update sketches, and a partition that spreads families over clients."""

import math

import pytest
import torch

from matu_lib.aggregation import centre_updates, sign_sketch, sketch_similarity
from matu_lib.communication import Payload
from matu_lib.data import partition
from matu_lib.server import MaTUServer, UploadRejected, validate_upload


def _pair(cos: float, n: int = 50_000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a, noise = torch.randn(n, generator=g), torch.randn(n, generator=g)
    return a, cos * a + math.sqrt(1 - cos * cos) * noise


@pytest.mark.parametrize("cos", [-0.6, 0.0, 0.3, 0.8])
def test_sketch_similarity_estimates_the_cosine_of_the_directions(cos):
    a, b = _pair(cos)
    sim = sketch_similarity([[sign_sketch(a, 2048)], [sign_sketch(b, 2048)]])
    assert sim.shape == (2, 2) and sim[0, 0] == pytest.approx(1.0)
    assert float(sim[0, 1]) == pytest.approx(cos, abs=0.08)  # SimHash error at 2048 bits is ~0.03


def test_sketch_is_scale_invariant_seeded_and_compact():
    a, _ = _pair(0.0)
    s = sign_sketch(a, 256)
    assert s.dtype == torch.bool and s.numel() == 256
    assert torch.equal(s, sign_sketch(3.5 * a, 256))  # direction only
    assert torch.equal(~s, sign_sketch(-a, 256))  # opposite direction, every bit flips
    assert not torch.equal(s, sign_sketch(a, 256, seed=1))  # another projection, other bits
    payload = Payload(0, ("t",), sketches={"t": s}, counts={"t": 1})
    assert payload.nbytes()["sketches"] == 32
    back = Payload.from_bytes(payload.to_bytes())
    assert torch.equal(back.sketches["t"], s) and len(payload.to_bytes()) == payload.nbytes()["total"]


def test_holders_are_averaged_before_comparing():
    a, b = _pair(0.0, seed=1)
    # task 0 held by two clients that learned a; task 1 by one client that learned b and one that learned a
    sim = sketch_similarity([[sign_sketch(a), sign_sketch(a)], [sign_sketch(b), sign_sketch(a)]])
    alone = sketch_similarity([[sign_sketch(a)], [sign_sketch(b)]])
    assert float(sim[0, 1]) > float(alone[0, 1]) + 0.3


def test_server_reports_both_measures_and_uses_the_chosen_one():
    n = 4000
    a, b = _pair(0.9, n=n, seed=2)
    c, _ = _pair(0.0, n=n, seed=3)
    ups = []
    for k, (tasks, vecs) in enumerate([(("x", "y"), (a, c)), (("x", "z"), (b, c))]):
        ups.append(
            Payload(
                k,
                tasks,
                {"unified": torch.zeros(n)},
                counts={t: 10 for t in tasks},
                sketches={t: sign_sketch(v, 512) for t, v in zip(tasks, vecs)},
            )
        )
    _, info = MaTUServer(similarity="sketch").aggregate(ups)
    assert info["tasks"] == ["x", "y", "z"]
    assert info["similarity"] == info["similarity_sketch"] and "similarity_vector" in info
    s = torch.tensor(info["similarity_sketch"])
    assert s[1, 2] > 0.9  # y and z were sketched from the same vector c
    _, info = MaTUServer(similarity="cosine").aggregate(ups)
    assert info["similarity"] == info["similarity_vector"]
    ups[1].sketches = {}
    with pytest.raises(UploadRejected, match="sketch"):
        MaTUServer(similarity="sketch").aggregate(ups)


def _drifting_clients(n: int = 20_000, drift: float = 3.0):
    """3 families (one direction each); 3 clients, each holding one task of every family; every task a client
    trains also moves along that client's own drift, ``drift`` times longer than what the task learned."""
    g = torch.Generator().manual_seed(7)
    family = [torch.randn(n, generator=g) for _ in range(3)]
    updates, truth = {}, {}
    for k in range(3):
        common = drift * torch.randn(n, generator=g)
        updates[k] = {}
        for f in range(3):
            task = f"f{f}c{k}"  # each task on one client, so tasks of a family meet only at the server
            updates[k][task] = family[f] + 0.5 * torch.randn(n, generator=g) + common
            truth[task] = f"f{f}"
    return updates, truth


@pytest.mark.parametrize("centre", [False, True])
def test_centring_on_the_client_lets_sketches_find_the_families(centre):
    from matu_lib.geometry import family_ari

    updates, truth = _drifting_clients()
    tasks, sketches = [], []
    for per_task in updates.values():
        per_task = centre_updates(per_task) if centre else per_task
        for t, u in per_task.items():
            tasks.append(t)
            sketches.append([sign_sketch(u, 1024)])
    ari = family_ari(sketch_similarity(sketches).numpy(), tasks, truth)["ari"]
    if centre:
        assert ari == pytest.approx(1.0)  # the client's drift is gone: families recovered exactly
    else:
        assert ari < 0.2  # the drift dominates the signs: tasks group by client


def test_centred_updates_are_unit_updates_minus_their_mean():
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(500, generator=g) for _ in range(3))
    out = centre_updates({"a": a, "b": 10 * b, "c": c})
    units = [a / a.norm(), b / b.norm(), c / c.norm()]
    mean = sum(units) / 3
    for got, unit in zip(out.values(), units):
        assert torch.allclose(got, unit - mean, atol=1e-6)
    assert torch.allclose(sum(out.values()), torch.zeros(500), atol=1e-5)  # centred: they sum to zero
    assert list(out) == ["a", "b", "c"]
    two = centre_updates({"a": a, "b": b})
    assert torch.allclose(two["a"], -two["b"])  # two tasks: opposite
    assert torch.equal(centre_updates({"a": a})["a"], a)  # one task: nothing to centre on


def test_a_sketch_for_a_task_not_held_is_rejected():
    up = Payload(
        3, ("x",), {"unified": torch.zeros(8)}, counts={"x": 1}, sketches={"y": torch.ones(16, dtype=torch.bool)}
    )
    with pytest.raises(UploadRejected, match="client 3"):
        validate_upload(up, 8, {"x", "y"}, {"unified"})


def test_partition_spreads_families_over_clients():
    tasks = {f"{fam}{i}": 40 for fam in "abcd" for i in range(3)}  # 4 families of 3 tasks
    families = {t: t[0] for t in tasks}
    spread = partition(tasks, 8, (3, 4), 2, seed=0, families=families)
    for k in range(8):
        held = [families[t] for t in spread.tasks_of(k)]
        assert len(held) == len(set(held)), f"client {k} holds two tasks of one family: {spread.tasks_of(k)}"
    assert min(len(spread.clients_of(t)) for t in tasks) >= 2
    clumped = [partition(tasks, 8, (3, 4), 2, seed=s) for s in range(5)]
    assert any(
        len(set(families[t] for t in m.tasks_of(k))) < len(m.tasks_of(k)) for m in clumped for k in range(8)
    )  # without families, clumping happens
