import pytest
import torch

from matu_lib.task_vectors import TaskVector


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(4, 3, generator=g), "b.bias": torch.randn(5, generator=g)}


@pytest.fixture()
def vectors():
    base, t1, t2 = _state(0), _state(1), _state(2)
    return base, TaskVector.from_weights(base, t1), TaskVector.from_weights(base, t2), t1


def _close(a: TaskVector, b: TaskVector) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a.vector[k], b.vector[k], atol=1e-6) for k in a.keys())


def test_algebra_laws(vectors):
    base, a, b, _ = vectors
    assert (a + (-a)).norm() == 0.0
    assert _close(a + b, b + a)
    assert _close((a - b) + b, a)
    assert _close(2 * a, a + a)
    assert _close(a * 0.5, 0.5 * a)
    assert _close(sum([a, b]), TaskVector.sum([a, b]))
    assert _close(TaskVector.sum([a, b]), a + b)


def test_apply_coef_zero_and_one(vectors):
    base, a, _, tuned = vectors
    assert all(torch.equal(a.apply_to(base, 0.0)[k], base[k]) for k in base)
    applied = a.apply_to(base, 1.0)
    assert all(torch.allclose(applied[k], tuned[k], atol=1e-6) for k in base)


def test_apply_to_module_in_place():
    lin = torch.nn.Linear(3, 2)
    base = {k: v.detach().clone() for k, v in lin.named_parameters()}
    tv = TaskVector({k: torch.ones_like(v) for k, v in base.items()})
    tv.apply_to(lin, 2.0)
    assert torch.allclose(lin.weight, base["weight"] + 2)


def test_flatten_round_trip(vectors):
    _, a, _, _ = vectors
    flat = a.flatten()
    assert flat.shape == (a.numel(),) == (17,)
    assert _close(TaskVector.unflatten(flat, a.layout()), a)
    with pytest.raises(ValueError, match="expected a 1-D tensor of 17"):
        TaskVector.unflatten(flat[:-1], a.layout())


def test_geometry(vectors):
    _, a, b, _ = vectors
    assert a.cosine(a) == pytest.approx(1.0)
    assert a.cosine(-a) == pytest.approx(-1.0)
    flat_a, flat_b = a.flatten(), b.flatten()
    assert a.cosine(b) == pytest.approx(float(torch.nn.functional.cosine_similarity(flat_a, flat_b, dim=0)), abs=1e-6)
    assert a.norm() == pytest.approx(float(flat_a.norm()), rel=1e-6)
    assert a.sign_agreement(a) == 1.0 and a.sign_agreement(-a) == 0.0
    expected = float((torch.sign(flat_a) == torch.sign(flat_b)).float().mean())
    assert a.sign_agreement(b) == pytest.approx(expected)


def test_mismatch_is_refused(vectors):
    base, a, _, _ = vectors
    other = TaskVector({"a.weight": torch.zeros(4, 3)})
    with pytest.raises(KeyError, match="parameter names differ"):
        a + other
    wrong = TaskVector({"a.weight": torch.zeros(3, 4), "b.bias": torch.zeros(5)})
    with pytest.raises(ValueError, match="shape mismatch for 'a.weight'"):
        a - wrong


def test_save_load_round_trip_and_corruption(vectors, tmp_path):
    _, a, _, _ = vectors
    path = tmp_path / "tau.safetensors"
    a.save(path, {"task": "toy"})
    loaded = TaskVector.load(path)
    assert loaded.keys() == a.keys() and all(torch.equal(loaded.vector[k], a.vector[k]) for k in a.keys())
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(ValueError, match="Could not read task vector"):
        TaskVector.load(path)
