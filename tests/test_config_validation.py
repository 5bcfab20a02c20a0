"""Run config values checked for range and meaning before any work: each refusal is one line naming the field,
the value and what is accepted, and nothing is loaded or written first."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from matu_lib import federation
from matu_lib.presets import PRESETS, ConfigError, RunConfig, check_runnable, preset


@pytest.mark.parametrize(
    "overrides, field, accepted",
    [
        ({"max_train_per_task": -5}, "max_train_per_task", "none (no cap) or >= 1"),
        ({"max_train_per_task": 0}, "max_train_per_task", "none (no cap) or >= 1"),
        ({"seed": -1}, "seed", "an integer in [0, "),
        ({"lr": 1e30}, "lr", "(0, 1]"),
        ({"lr": 0.0}, "lr", "(0, 1]"),
        ({"lr": math.inf}, "lr", "finite"),
        ({"weight_decay": -1.0}, "weight_decay", ">= 0"),
        ({"weight_decay": 5000.0}, "weight_decay", "lr x weight_decay < 1"),
        ({"eval_batch_size": 0}, "eval_batch_size", ">= 1"),
        ({"batch_size": 0}, "batch_size", ">= 1"),
        ({"warmup_steps": -1}, "warmup_steps", ">= 0"),
        ({"grad_clip": -1.0}, "grad_clip", ">= 0"),
        ({"dirichlet_alpha": 0.0}, "dirichlet_alpha", "> 0"),
        ({"participation": 0.0}, "participation", "(0, 1]"),
        ({"participation": 1.5}, "participation", "(0, 1]"),
        ({"upload_topk": 0.0}, "upload_topk", "(0, 1]"),
        ({"transfer_threshold": 2.0}, "transfer_threshold", "[-1, 1]"),
        ({"fedprox_mu": -0.1}, "fedprox_mu", ">= 0"),
        ({"sketch_bits": 10**9}, "sketch_bits", "in [0, "),
        ({"merge_coefs": (0.3, math.nan)}, "merge_coefs", "finite"),
        ({"device": "gpu"}, "device", "'cpu', 'cuda'"),
        ({"rounds": 0}, "rounds", ">= 1"),
        ({"tasks": ("mnist", "mnist", "textures")}, "tasks", "distinct task names (repeated: ['mnist'])"),
    ],
)
def test_out_of_range_values_are_refused_naming_field_value_and_range(overrides, field, accepted):
    """Checked by ``RunConfig`` itself (``replace`` builds it without ``preset``'s type checks)."""
    with pytest.raises(ConfigError) as err:
        replace(PRESETS["smoke"], **overrides)
    message = str(err.value)
    assert f"{field} must be " in message and accepted in message and "\n" not in message
    assert repr(next(iter(overrides.values()))) in message  # the value given
    assert len(message) < 400  # the value and the range, not a dump of the whole config


def test_every_preset_and_the_default_config_pass_their_own_checks():
    assert RunConfig().preset == "custom"
    for name in ("smoke", "cpu", "cpu-full"):
        check_runnable(PRESETS[name])


def test_preset_cannot_be_overridden():
    with pytest.raises(ConfigError, match="preset cannot be overridden .*preset='cpu'"):
        preset("smoke", preset="cpu")


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"n_clients": 100000}, "n_clients=100000 with tasks_per_client (2, 2) needs at least 200000"),
        ({"model": "nosuchmodel"}, "model='nosuchmodel' is not a known model; accepted: ['matu-micro'"),
        ({"pretrained": "missing.pt"}, "pretrained='missing.pt': no such file; accepted:"),
        ({"device": "cuda"}, "device='cuda' needs a CUDA GPU, and this machine has none; accepted here: 'cpu'"),
        ({"tasks": ("mnist", "mnst")}, "unknown tasks ['mnst']"),
        ({"tasks": None, "n_clients": 2}, "n_clients=2 x tasks_per_client max 2 gives fewer slots than"),
        ({"tasks_per_client": (50, 50)}, "tasks_per_client must be (lo, hi) with hi <= the number of tasks (4)"),
    ],
)
def test_build_context_refuses_what_cannot_run_before_loading_data(overrides, message, monkeypatch):
    """A partition, device, model or file that cannot work is refused before any data is loaded."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(federation, "_task_splits", lambda cfg: pytest.fail("data loaded before the check"))
    with pytest.raises(ConfigError) as err:
        federation.build_context(preset("smoke", **overrides), log=lambda *_: None)
    assert message in str(err.value) and "\n" not in str(err.value)


def _cli(args: list[str], capsys) -> tuple[int, str]:
    from matu_lib.__main__ import main

    rc = main(args)
    return rc, capsys.readouterr().err.strip()


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "--seed", "-1"], "seed must be an integer in [0, 4294967295], got -1"),
        (["compare", "--seeds", "0", "-1", "--methods", "matu"], "seed must be an integer in [0, 4294967295], got -1"),
        (["compare", "--bootstrap", "0", "--methods", "matu"], "--bootstrap must be >= 1"),
        (["run", "--set", "max_train_per_task=-5"], "max_train_per_task must be none (no cap) or >= 1, got -5"),
        (["run", "--set", "tasks=mnist,mnist,textures"], "tasks must be distinct task names"),
        (["run", "--set", "preset=cpu"], "preset cannot be overridden"),
        (["run", "--set", "lr=1e300"], "lr must be a finite number in (0, 1], got 1e+300"),
        (["run", "--set", "eval_batch_size=0"], "eval_batch_size must be >= 1, got 0"),
        (["run", "--set", "weight_decay=-1"], "weight_decay must be a finite number >= 0"),
        (["run", "--set", "device=cuda"], "device='cuda' needs a CUDA GPU"),
        (["run", "--set", "model=nosuchmodel"], "model='nosuchmodel' is not a known model"),
        (["run", "--set", "pretrained=missing.pt"], "pretrained='missing.pt': no such file"),
        (["run", "--set", "n_clients=100000"], "n_clients=100000 with tasks_per_client (2, 2)"),
        (
            ["run", "--set", "tasks_per_client=(50,50)"],
            "tasks_per_client must be (lo, hi) with hi <= the number of tasks",
        ),
    ],
)
def test_cli_refuses_each_value_in_one_line_before_any_work(args, message, tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(federation, "build_context", lambda *a, **k: pytest.fail("work started before validation"))
    out = tmp_path / "out"
    rc, err = _cli([*args, "--preset", "smoke", "--out", str(out)], capsys)
    assert rc == 2 and message in err and "\n" not in err
    assert not out.exists()


def test_a_run_far_beyond_its_preset_says_so_with_an_estimate_before_work_starts(tmp_path, capsys, monkeypatch):
    from matu_lib.presets import LONG_RUN_FACTOR, long_run_warning, training_work

    assert long_run_warning(preset("smoke")) is None and long_run_warning(preset("cpu")) is None
    base = preset("cpu")
    just_below = preset("cpu", rounds=base.rounds * LONG_RUN_FACTOR - 1)
    assert training_work(just_below) < LONG_RUN_FACTOR * training_work(base) and long_run_warning(just_below) is None
    line = long_run_warning(preset("cpu", rounds=base.rounds * 100))
    assert "100x the cpu preset's training work" in line and "about 2 hours per method run" in line  # 100 x 76 s

    class Started(Exception):
        pass

    def started(*args, **kwargs):
        raise Started

    monkeypatch.setattr(federation, "build_context", started)
    with pytest.raises(Started):  # warned, not refused: the run starts
        _cli(["run", "--preset", "smoke", "--out", str(tmp_path / "out"), "--set", "rounds=100000000"], capsys)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: this run asks for 100,000,000x the smoke preset's training")
    assert "years per method run" in err[0]  # against the smoke reference's own run, rounds=1
