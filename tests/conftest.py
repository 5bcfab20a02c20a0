"""Shared fixtures. Tests never touch the network: HF_HUB_OFFLINE makes a missing download fail at once."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MATU_PROGRESS", "0")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest
import torch


@pytest.fixture(scope="session")
def micro_backbone():
    from matu_lib.backbones import load_backbone

    return load_backbone("matu-micro", pretrained=None)


@pytest.fixture()
def toy_task():
    """A learnable two-class image task: dark vs bright images with random texture."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (384, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.arange(384) % 2
    x[y == 1] = x[y == 1] // 3
    return (x[:256], y[:256]), (x[256:], y[256:])


@pytest.fixture
def check_expectations():
    """Check a notebook execution's ``expectations.json``: its near-claims, judged against the reference it ran
    with (same preset and seed), all hold (they use the reference's tolerances), and its qualitative claims were
    each decided one way or the other."""
    import json

    def check(name, out, reference):
        saved = json.loads((out / "expectations.json").read_text())
        assert (saved["preset"], saved["seed"]) == (reference["preset"], reference["seed"])
        near = [c for c in saved["claims"] if c["kind"] == "near"]
        assert near and all(c["status"] == "as expected" for c in near), (
            name,
            [c for c in near if c["status"] != "as expected"],
        )
        that = [c for c in saved["claims"] if c["kind"] == "that"]
        assert that and all(c["status"] in ("as expected", "NOT as expected") for c in that), (name, that)

    return check
