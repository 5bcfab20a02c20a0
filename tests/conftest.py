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
