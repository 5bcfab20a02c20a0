"""Tests for matu_lib.data: registry, builders, cache, partition, real-dataset errors, corpus."""

from __future__ import annotations

import hashlib
import json
import time

import numpy as np
import pytest
import torch

from matu_lib.data import (
    REAL_TASKS,
    DatasetNotAvailable,
    build_task,
    corpus_vocabulary_coverage,
    get_task,
    list_families,
    list_tasks,
    load_real_task,
    load_suite,
    load_task,
    make_corpus,
    partition,
)
from matu_lib.data import suite as suite_mod

# a small, varied subset: real + real variant + procedural of several families (and a tiny one)
SUBSET = ["sklearn_digits", "mnist_rotated", "animals_farm", "faces", "shapes", "textures", "traffic_signs"]


def _hashes(x: torch.Tensor) -> list[bytes]:
    return [hashlib.sha1(img.numpy().tobytes()).digest() for img in x]


@pytest.fixture(scope="module")
def built() -> dict:
    torch.set_num_threads(1)
    return {n: build_task(n, seed=0) for n in SUBSET}


def test_registry_metadata():
    names = list_tasks()
    assert len(names) >= 30 and len(set(names)) == len(names)
    fams = list_families()
    assert len(fams) >= 5 and sum(len(v) for v in fams.values()) == len(names)
    assert sum(get_task(n).source == "real" for n in names) >= 5
    for n in names:
        s = get_task(n)
        assert s.source in ("real", "procedural") and s.family in fams
        assert len(set(s.classes)) == len(s.classes) >= 2, n
        assert 1 <= len(s.templates) <= 3 and all("{}" in t for t in s.templates), n
        assert min(s.n_train, s.n_val, s.n_test) > 0 and s.stands_in_for and s.description
    assert list_tasks("animals") == fams["animals"]
    with pytest.raises(KeyError, match="mnist"):  # message lists valid names
        get_task("no_such_task")


@pytest.mark.parametrize("name", SUBSET)
def test_shapes_dtypes_labels(built, name):
    d = built[name]
    for split in ("train", "val", "test"):
        x, y = d.split(split)
        assert x.dtype == torch.uint8 and x.shape == (d.spec.sizes[split], 3, 32, 32)
        assert y.dtype == torch.int64 and y.shape == (len(x),)
        assert int(y.min()) >= 0 and int(y.max()) < len(d.spec.classes)
        assert len(torch.unique(y)) == len(d.spec.classes)  # every class present in every split
        assert x.float().std() > 5  # not blank


@pytest.mark.parametrize("name", SUBSET)
def test_splits_disjoint(built, name):
    d = built[name]
    tr, va, te = (set(_hashes(d.split(s)[0])) for s in ("train", "val", "test"))
    assert not (tr & va) and not (tr & te) and not (va & te)


def test_real_source_deduplicated():
    # animal-mnist ships 284 exact duplicates; splitting raw indices would leak images across splits
    x, _ = suite_mod.animal_source()
    assert len({img.tobytes() for img in x}) == len(x)


def test_determinism(built):
    for name in ("shapes", "mnist_rotated"):
        again = build_task(name, seed=0)
        assert _hashes(again.train_x) == _hashes(built[name].train_x)
        assert torch.equal(again.test_y, built[name].test_y)
    other = build_task("shapes", seed=1)
    assert _hashes(other.train_x) != _hashes(built["shapes"].train_x)


def test_cache_roundtrip_stale_and_corrupt(tmp_path, monkeypatch):
    a = load_task("faces", data_dir=tmp_path, seed=3)
    path = suite_mod.cache_path("faces", tmp_path, 3)
    assert path.exists()
    calls = []
    real_build = suite_mod.build_task
    monkeypatch.setattr(suite_mod, "build_task", lambda n, s=0: calls.append(n) or real_build(n, s))
    b = load_task("faces", data_dir=tmp_path, seed=3)
    assert calls == [] and torch.equal(a.train_x, b.train_x) and torch.equal(a.val_y, b.val_y)
    # corrupt file -> rebuilt, not trusted
    path.write_bytes(b"not a safetensors file")
    c = load_task("faces", data_dir=tmp_path, seed=3)
    assert calls == ["faces"] and torch.equal(a.train_x, c.train_x)
    # a file written under another version sitting at this path -> rebuilt
    monkeypatch.setattr(suite_mod, "SUITE_VERSION", "v-old")
    suite_mod._write_cache(path, a, 3)  # metadata now says v-old
    monkeypatch.undo()
    monkeypatch.setattr(suite_mod, "build_task", lambda n, s=0: calls.append(n) or real_build(n, s))
    load_task("faces", data_dir=tmp_path, seed=3)
    assert calls == ["faces", "faces"]
    assert not list(tmp_path.glob("*.tmp"))
    suite = load_suite(["faces"], data_dir=tmp_path, seed=3)
    assert list(suite) == ["faces"]


def _sizes(n_tasks=6, n=200):
    return {f"t{i}": n + 10 * i for i in range(n_tasks)}


def test_partition_invariants():
    sizes = _sizes()
    m = partition(sizes, n_clients=5, tasks_per_client=(2, 3), seed=7)
    for c in range(5):
        assert 2 <= len(m.tasks_of(c)) <= 3 and len(set(m.tasks_of(c))) == len(m.tasks_of(c))
    shared = 0
    for t, n in sizes.items():
        holders = m.clients_of(t)
        assert holders, t
        shared += len(holders) > 1
        all_idx = [i for c in holders for i in m.indices(c, t)]
        assert len(all_idx) == len(set(all_idx)) == n and min(all_idx) >= 0 and max(all_idx) < n
        counts = [len(m.indices(c, t)) for c in holders]
        assert max(counts) - min(counts) <= 1  # IID: equal split
    assert shared >= len(sizes) // 2  # most tasks shared
    assert json.loads(json.dumps(m.to_dict()))["n_clients"] == 5
    assert "client" in m.summary() and "t0" in m.summary()
    assert partition(sizes, 5, (2, 3), seed=7) == m
    assert partition(sizes, 5, (2, 3), seed=8) != m


def test_partition_coverage_min_clients():
    sizes = _sizes(n_tasks=10)
    m = partition(sizes, n_clients=4, tasks_per_client=(1, 5), clients_per_task_min=2, seed=0)
    assert all(len(m.clients_of(t)) >= 2 for t in sizes)


def test_partition_dirichlet_skew():
    rng = np.random.default_rng(0)
    labels = {t: torch.from_numpy(rng.permutation(np.arange(n) % 10)) for t, n in _sizes(4, 400).items()}
    sizes = {t: len(v) for t, v in labels.items()}

    def mean_skew(split, alpha=0.1):
        m = partition(sizes, 4, (3, 4), split=split, alpha=alpha, labels=labels, seed=1)
        tvs = []
        for s in m.shards:
            h = np.bincount(labels[s.task][list(s.indices)].numpy(), minlength=10) / len(s.indices)
            tvs.append(0.5 * np.abs(h - 0.1).sum())  # total-variation distance to uniform
            assert len(s.indices) >= 1
        for t in sizes:
            idx = [i for c in m.clients_of(t) for i in m.indices(c, t)]
            assert len(idx) == len(set(idx)) == sizes[t]
        return np.mean(tvs)

    assert mean_skew("dirichlet") > 0.3 > 0.15 > mean_skew("iid")


@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(n_clients=0), "n_clients"),
        (dict(n_clients=3, tasks_per_client=(3, 2)), "tasks_per_client"),
        (dict(n_clients=3, tasks_per_client=(1, 9)), "exceeds"),
        (dict(n_clients=2, tasks_per_client=(1, 2)), "unheld"),
        (dict(n_clients=3, split="pathological"), "split"),
        (dict(n_clients=3, split="dirichlet"), "labels"),
    ],
)
def test_partition_bad_args(kwargs, word):
    with pytest.raises(ValueError, match=word):
        partition(_sizes(), **kwargs)


def test_real_registry_and_missing_error(tmp_path):
    assert len(REAL_TASKS) >= 30
    for name in ("MNIST", "GTSRB", "EuroSAT", "CLEVRCount", "SVHN"):
        t0 = time.perf_counter()
        with pytest.raises(DatasetNotAvailable) as e:
            load_real_task(name, tmp_path / "real", split=REAL_TASKS[name].splits[0])
        assert time.perf_counter() - t0 < 1.0
        msg = str(e.value)
        assert name in msg and str(tmp_path / "real") in msg and "download=True" in msg
    assert isinstance(e.value, FileNotFoundError)
    with pytest.raises(KeyError, match="torchvision"):
        load_real_task("RESISC45", tmp_path)
    for info in REAL_TASKS.values():
        assert all("{}" in t for t in info.templates)


def test_corpus_shapes_determinism_coverage():
    torch.set_num_threads(1)
    x, caps = make_corpus(3000, seed=0, workers=1)
    assert x.shape == (3000, 3, 32, 32) and x.dtype == torch.uint8 and len(caps) == 3000
    assert all(isinstance(c, str) and c for c in caps)
    x2, caps2 = make_corpus(3000, seed=0, workers=2)  # chunked seeding: worker count does not matter
    assert torch.equal(x, x2) and caps == caps2
    assert make_corpus(300, seed=1, workers=1)[1] != caps[:300]
    cov = corpus_vocabulary_coverage(caps)
    procedural = [n for n in list_tasks() if get_task(n).source == "procedural"]
    assert min(cov[n] for n in procedural) == 1.0, {n: cov[n] for n in procedural if cov[n] < 1}
    assert np.mean(list(cov.values())) > 0.9
    # colour must not dominate: a minority of captions name a colour
    colour_words = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "white", "black")
    assert np.mean([any(w in c.split() for w in colour_words) for c in caps]) < 0.4
    assert corpus_vocabulary_coverage(["a red circle."])["shapes"] == pytest.approx(1 / 6)
