"""The gpu preset's dry run: its path runs end to end here, and its estimates come from exact byte counts."""

from __future__ import annotations

import pytest
import torch

from matu_lib.communication import Payload
from matu_lib.dryrun import DryRunOptions, dry_run, round_bytes
from matu_lib.presets import preset


def test_round_bytes_equals_serialised_payloads():
    n = 1003
    held = [("DTD", "EuroSAT"), ("EuroSAT", "RenderedSST2", "PCAM")]
    counts = [{"DTD": 5, "EuroSAT": 12}, {"EuroSAT": 7, "RenderedSST2": 30, "PCAM": 2}]
    up = down = 0
    for k, tasks in enumerate(held):
        vec, mask = torch.randn(n), torch.rand(n) > 0.5
        up += len(
            Payload(
                k,
                tasks,
                {"unified": vec},
                {t: mask for t in tasks},
                {t: 0.5 for t in tasks},
                counts[k],
                {t: torch.rand(64) > 0.5 for t in tasks},
            ).to_bytes()
        )
        down += len(
            Payload(k, tasks, {"unified": vec}, {t: mask for t in tasks}, {t: 0.5 for t in tasks}, {}).to_bytes()
        )
    assert round_bytes("matu", held, n, counts, sketch_bits=64) == (up, down)
    fedavg_up = sum(
        len(Payload(k, t, {"model": torch.randn(n)}, counts=counts[k]).to_bytes()) for k, t in enumerate(held)
    )
    assert round_bytes("fedavg", held, n, counts)[0] == fedavg_up
    with pytest.raises(ValueError, match="ties"):
        round_bytes("ties", held, n)


def test_dry_run_refuses_offline_presets():
    with pytest.raises(ValueError, match="real-data path"):
        dry_run("smoke")


def test_dry_run_path_and_estimates_with_a_small_backbone():
    """The whole path (fakes through torchvision, workers, both methods, evaluation, measurements) with matu-micro
    in place of ViT-B-32, so the logic is checked in seconds; the ViT-B-32 run is the slow test below."""
    lines: list[str] = []
    report = dry_run("gpu", options=DryRunOptions(model="matu-micro", device="cpu"), log=lines.append)
    full = preset("gpu")
    assert set(report["rounds"]) == {"matu", "fedavg"} and report["device"] == "cpu"
    assert report["bytes_formula_matches_dry_run"]
    assert all(r["bytes_up"] > 4 * report["n_params"] for r in report["rounds"].values())
    assert report["activation_bytes_per_image"] > 0 and report["forward_flops_per_image"] > 0
    est = report["estimate"]
    assert est["tasks"] == 31 and est["clients"] == full.n_clients
    assert 2 * full.n_clients <= est["pairs"] <= 5 * full.n_clients
    assert est["steps_per_round"] == est["pairs"] * full.local_steps
    assert est["gpu_memory_bytes"] == 4 * report["n_params_clip"] + 16 * report["n_params"] + est["activation_bytes"]
    assert est["matu_bytes_up"] > est["fedavg_bytes_up"]  # MaTU also sends a mask per task
    text = "\n".join(lines)
    assert "ESTIMATE" in text and "ASSUMED" in text and "GPU memory" in text


@pytest.mark.long
def test_gpu_preset_dry_run_cli_with_vit_b_32(capsys):
    """The command a user runs: ViT-B-32 with random weights. It used 4.5 CPU-minutes on the project machine
    (its wall time there measured the shared machine's load), hence `slow`; the fast test above covers the logic."""
    from matu_lib.__main__ import main

    assert main(["run", "--preset", "gpu", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "ViT-B-32" in out and "87,849,216" in out and "ESTIMATE" in out
    assert "reproduces the dry run's measured bytes: yes" in out
