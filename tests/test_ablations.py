"""The ablation grid is valid data, and the runner trains each distinct setting once with honest bytes."""

import json
import math
from dataclasses import fields

import pytest

from matu_lib.ablations import ABLATIONS, RUN_ONLY_FIELDS, bytes_to_target, run_ablations, run_folder
from matu_lib.presets import RunConfig, preset

FIELDS = {f.name for f in fields(RunConfig)}


def test_grid_structure_is_valid():
    for axis, settings in ABLATIONS.items():
        names = [name for name, _ in settings]
        assert settings[0] == ("MaTU", {}), f"{axis}: the first setting must be the MaTU default"
        assert len(names) == len(set(names)) >= 2, f"{axis}: settings need distinct names"
        for name, overrides in settings:
            assert set(overrides) <= FIELDS, f"{axis}/{name}: unknown RunConfig keys {set(overrides) - FIELDS}"
            for p in ("smoke", "cpu", "gpu"):
                cfg = preset(p, **overrides)  # validates values in __post_init__
                assert all(getattr(cfg, k) == (tuple(v) if isinstance(v, list) else v) for k, v in overrides.items())
    assert RUN_ONLY_FIELDS <= FIELDS


def test_settings_differ_from_default_on_the_cpu_preset():
    base = preset("cpu")
    for axis, settings in ABLATIONS.items():
        for name, overrides in settings[1:]:
            assert preset("cpu", **overrides) != base, f"{axis}/{name} is a no-op on cpu"


def test_run_folder_is_per_config(tmp_path):
    a, b = preset("smoke"), preset("smoke", use_masks=False)
    assert run_folder(a, {}, tmp_path) == run_folder(a, {}, tmp_path)
    assert run_folder(a, {}, tmp_path) != run_folder(preset("smoke", seed=1), {}, tmp_path)
    assert run_folder(b, {"use_masks": False}, tmp_path).name.startswith("use_masks=False-")


def test_bytes_to_target_first_crossing():
    hist = {
        "a": [
            {"mean_acc": 0.2, "cum_bytes_up": 10},
            {"mean_acc": 0.6, "cum_bytes_up": 20},
            {"mean_acc": 0.7, "cum_bytes_up": 30},
        ],
        "b": [{"mean_acc": 0.3, "cum_bytes_up": 5}],
    }
    assert bytes_to_target(hist, 0.5) == {"a": 20.0, "b": None}


def test_unknown_axis_raises():
    with pytest.raises(KeyError, match="unknown ablation axes"):
        run_ablations(preset("smoke"), ["maskz"])


@pytest.fixture(scope="module")
def tiny_rows(tmp_path_factory):
    from matu_lib.federation import build_context

    cfg = preset("smoke", rounds=1, local_steps=2)
    ctx = build_context(cfg, log=lambda *_: None)
    out = tmp_path_factory.mktemp("ablations")
    rows = run_ablations(cfg, ["masks", "rescalers", "number of clients"], out, log=lambda *_: None, base_ctx=ctx)
    return cfg, ctx, out, rows


def test_run_ablations_rows(tiny_rows):
    cfg, ctx, out, rows = tiny_rows
    expected = [(a, s) for a in ("masks", "rescalers", "number of clients") for s, _ in ABLATIONS[a]]
    assert [(r["axis"], r["setting"]) for r in rows] == expected
    ok = [r for r in rows if r["status"] == "ok"]
    assert all(math.isfinite(r["mean_acc"]) and math.isfinite(r["mean_normalised"]) for r in ok)
    by = {(r["axis"], r["setting"]): r for r in rows}
    default = by[("masks", "MaTU")]
    # identical configs are one run: the default is shared by every axis
    assert by[("rescalers", "MaTU")]["folder"] == default["folder"] == by[("number of clients", "MaTU")]["folder"]
    assert by[("rescalers", "MaTU")]["mean_acc"] == default["mean_acc"]
    # the bytes follow the components: no masks -> no mask bytes; no rescalers -> 4 bytes less per task
    n, pairs = ctx.trainer.n_params, sum(len(c.tasks) for c in ctx.clients)
    no_masks = by[("masks", "no masks")]
    assert (
        no_masks["bytes_up_parts"].get("masks", 0) == 0 < default["bytes_up_parts"]["masks"] == pairs * math.ceil(n / 8)
    )
    assert no_masks["bytes_up_per_round"] < default["bytes_up_per_round"]
    assert by[("rescalers", "no rescalers")]["bytes_up_parts"].get("rescalers", 0) == 0
    assert default["bytes_up_parts"]["rescalers"] == 4 * pairs
    assert all(r["server_state_bytes"] == 0 for r in ok)
    # a data-changing setting got its own partition: 16 clients upload one vector each
    assert by[("number of clients", "16 clients")]["bytes_up_parts"]["vectors"] == 16 * 4 * n


def test_run_ablations_reuses_finished_runs(tiny_rows):
    cfg, ctx, out, rows = tiny_rows
    again = run_ablations(cfg, ["masks"], out, log=lambda *_: None, base_ctx=ctx)
    assert [r["mean_acc"] for r in again] == [r["mean_acc"] for r in rows[:2]]
    assert [r["seconds"] for r in again] == [r["seconds"] for r in rows[:2]]  # read back, not retrained


def test_validate_settings_pairs_settings_on_seed_and_task(tmp_path):
    from matu_lib.ablations import format_validation, validate_settings

    cfg = preset("smoke", rounds=1, local_steps=1)
    settings = [("default", {}), ("no masks", {"use_masks": False})]
    summary = validate_settings(cfg, settings, [0, 1], tmp_path, n_boot=200, log=lambda *_: None)
    first, other = summary["rows"]
    assert summary["split"] == "val" and summary["seeds"] == [0, 1]
    assert "minus_first" not in first and len(first["per_seed"]) == 2
    d = other["minus_first"]
    # the paired mean difference is the difference of the per-seed means, averaged
    expected = sum(a - b for a, b in zip(other["per_seed"], first["per_seed"])) / 2
    assert abs(d["mean"] - expected) < 1e-9 and d["ci"][0] <= d["mean"] <= d["ci"][1]
    assert len(first["ari_sketch_last"]) == 2 and all(-1 <= x <= 1 for x in first["ari_sketch_last"])
    runs = sorted(p.name for p in (tmp_path / "seed0").iterdir())
    assert len(runs) == 2  # one folder per setting, resumable
    again = validate_settings(cfg, settings, [0, 1], tmp_path, n_boot=200, log=lambda *_: None)
    assert again["rows"][1]["per_seed"] == other["per_seed"]  # reused from disk, same numbers
    text = format_validation(summary, "cmd")
    assert "| no masks |" in text and "Written by `cmd`" in text


def test_a_choice_made_on_validation_is_reported_on_test(tmp_path):
    """``split="test"`` evaluates on test (and only at the last round), for reporting a choice's effect."""
    from matu_lib.ablations import format_validation, validate_settings

    cfg = preset("smoke", rounds=2, local_steps=1)
    settings = [("default", {}), ("no masks", {"use_masks": False})]
    summary = validate_settings(cfg, settings, [0], tmp_path, n_boot=200, log=lambda *_: None, split="test")
    assert summary["split"] == "test"
    configs = [json.loads((p / "config.json").read_text()) for p in (tmp_path / "seed0").iterdir()]
    assert {c["eval_split"] for c in configs} == {"test"} and {c["eval_every"] for c in configs} == {2}
    assert "Reporting on test" in format_validation(summary) and "**test** accuracy" in format_validation(summary)
