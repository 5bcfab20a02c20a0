"""Costs over a run: totals from the rounds' bytes, client steps by each method's budget rule (checked against
the optimiser steps the code really takes), the "Cost over the run" section and its words."""

import copy
import json

import pytest

from matu_lib import costs
from matu_lib.costs import STEP_RULES, add_costs, client_steps, cost_section, costs_in_words, run_cost

# ------------------------------------------------------------------------------ synthetic run folders

HOLDINGS = {0: ("a", "b"), 1: ("b", "c", "d"), 2: ("a",)}  # 6 (client, task) pairs
CONFIG = {"seed": 0, "rounds": 3, "local_steps": 5, "batch_size": 8}


def entry(r: int, sampled: list[int], up: int, down: int, cum: list[int], server_s: float = 0.25) -> dict:
    cum[0] += up
    cum[1] += down
    return {
        "round": r,
        "sampled": sampled,
        "bytes_up": {"total": up},
        "bytes_down": {"total": down},
        "cum_bytes_up": cum[0],
        "cum_bytes_down": cum[1],
        "server_state_bytes": 0,
        "rejected": [],
        "info": {},
        "server_seconds": server_s,
        "seconds": 9.0,
        "acc_clients": {f"{k}/{t}": 0.5 for k, ts in HOLDINGS.items() for t in ts},
    }


def write_run(folder, method: str, history: list[dict], **final) -> None:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"method": method, **CONFIG}))
    last = history[-1]
    summary = {
        "acc": {},
        "mean_acc": 0.5,
        "rounds": len(history),
        "total_bytes_up": last["cum_bytes_up"],
        "total_bytes_down": last["cum_bytes_down"],
        "server_state_bytes": 0,
        "seconds_total": 12.0,
    } | final
    (folder / "metrics.json").write_text(json.dumps({"method": method, "history": history, "final": summary}))


def iterative_history(per_round_up: int, per_round_down: int, sampled=((0, 1), (1, 2), (0, 1, 2))) -> list[dict]:
    cum = [0, 0]
    return [entry(r, list(s), per_round_up + r, per_round_down + 2 * r, cum) for r, s in enumerate(sampled, 1)]


def one_shot_history(up: int, down: int) -> list[dict]:
    return [entry(1, [0, 1, 2], up, down, [0, 0], server_s=0.0)]


def test_totals_are_the_sum_of_the_rounds_bytes(tmp_path):
    history = iterative_history(1000, 700)
    write_run(tmp_path / "matu", "matu", history)
    cost = run_cost(tmp_path / "matu")
    assert cost.bytes_up == sum(h["bytes_up"]["total"] for h in history) == 3006
    assert cost.bytes_down == sum(h["bytes_down"]["total"] for h in history) == 2112
    assert cost.bytes_total == 3006 + 2112
    assert cost.rounds == 3 and cost.server_seconds == pytest.approx(0.75)


def test_final_totals_that_disagree_with_the_rounds_are_refused(tmp_path):
    write_run(tmp_path / "matu", "matu", iterative_history(1000, 700), total_bytes_up=1)
    with pytest.raises(ValueError, match="do not add up"):
        run_cost(tmp_path / "matu")


def test_a_missing_metrics_file_is_one_clear_error(tmp_path):
    (tmp_path / "matu").mkdir()
    (tmp_path / "matu" / "config.json").write_text(json.dumps({"method": "matu", **CONFIG}))
    with pytest.raises(FileNotFoundError, match="metrics.json is missing"):
        run_cost(tmp_path / "matu")


def test_steps_follow_each_methods_budget_rule(tmp_path):
    sampled = ((0, 1), (1, 2), (0, 1, 2))  # tasks per client 2, 3, 1: rounds train 5, 4 and 6 pairs
    history = iterative_history(10, 10, sampled)
    assert client_steps("matu", CONFIG, history) == (5 + 4 + 6) * 5
    assert client_steps("per_task_fedavg", CONFIG, history) == (5 + 4 + 6) * 5
    assert client_steps("fedavg", CONFIG, history) == (5 + 4 + 6) * 5  # multitask: local_steps per task held
    one = one_shot_history(10, 10)
    for m in ("local", "tall_masks", "ties", "emr", "individual"):  # the whole budget at once, every pair
        assert client_steps(m, CONFIG, one) == 3 * 5 * 6
    assert client_steps("zero_shot", CONFIG, one) == 0
    with pytest.raises(ValueError, match="no budget rule for method 'mystery'"):
        client_steps("mystery", CONFIG, one)
    write_run(tmp_path / "tall_masks", "tall_masks", one)
    cost = run_cost(tmp_path / "tall_masks")
    assert (cost.rounds, cost.steps, cost.images, cost.server_seconds) == (1, 90, 90 * 8, None)
    write_run(tmp_path / "local", "local", one_shot_history(0, 0))
    assert run_cost(tmp_path / "local").rounds == 0  # nothing communicated: no synchronisation


def test_every_method_has_a_budget_rule():
    from matu_lib.methods import METHODS

    assert set(METHODS) == set(STEP_RULES)


@pytest.fixture(scope="module")
def counted_runs(tmp_path_factory):
    """Smoke runs of several methods with every optimiser step the trainer takes counted (an oracle)."""
    from matu_lib import training
    from matu_lib.federation import build_context, run
    from matu_lib.presets import preset

    ctx = build_context(
        preset(
            "smoke",
            model="matu-micro",
            pretrained=None,
            rounds=2,
            local_steps=2,
            participation=0.5,
            max_train_per_task=48,
        ),
        log=lambda *_: None,
    )
    counted = {"steps": 0}
    original = training.finetune

    def counting(model, data, cfg, *args, **kwargs):
        counted["steps"] += cfg.steps
        return original(model, data, cfg, *args, **kwargs)

    training.finetune = counting
    out, steps = tmp_path_factory.mktemp("runs"), {}
    try:
        for m in ("matu", "per_task_fedavg", "fedavg", "tall_masks", "individual", "zero_shot"):
            ctx.cache.clear()  # each method pays for its own local training
            counted["steps"] = 0
            run(ctx, m, out / m, log=lambda *_: None)
            steps[m] = counted["steps"]
    finally:
        training.finetune = original
    return out, steps


def test_counted_steps_equal_the_optimiser_steps_the_code_takes(counted_runs):
    out, steps = counted_runs
    for m, n in steps.items():
        assert run_cost(out / m).steps == n, m
    assert steps["matu"] > 0 and steps["matu"] == steps["per_task_fedavg"] == steps["fedavg"]


# ------------------------------------------------------------------------------ the section and its words


def interval(mean: float, lo: float, hi: float) -> dict:
    return {"mean": mean, "ci": [lo, hi], "level": 0.95, "scheme": "crossed", "n_boot": 100, "per_seed": [mean]}


def comparison(tmp_path) -> dict:
    """An ``aggregate_seeds``-shaped summary over one seed with run folders for costs: MaTU not separated from
    per-task FedAvg at a quarter of its bytes, ahead of TALL masks (one exchange), behind individual."""
    folder = tmp_path / "seed0"
    write_run(folder / "matu", "matu", iterative_history(100, 100))
    write_run(folder / "per_task_fedavg", "per_task_fedavg", iterative_history(400, 400), server_state_bytes=4000)
    write_run(folder / "tall_masks", "tall_masks", one_shot_history(350, 100))
    write_run(folder / "individual", "individual", one_shot_history(0, 0))
    norm = {"matu": 0.80, "per_task_fedavg": 0.82, "tall_masks": 0.70, "individual": 1.0}
    methods = {m: {"mean_acc": [v - 0.1, float("nan")], "mean_normalised": [v, float("nan")]} for m, v in norm.items()}
    diffs = {
        "per_task_fedavg": {"normalised": interval(-0.02, -0.07, 0.03), "acc": interval(-0.01, -0.04, 0.02)},
        "tall_masks": {"normalised": interval(0.10, 0.04, 0.16), "acc": interval(0.08, 0.03, 0.12)},
        "individual": {"normalised": interval(-0.20, -0.31, -0.11), "acc": interval(-0.1, -0.14, -0.07)},
    }
    summary = {"seeds": [0], "target": "matu", "reference": "individual", "methods": methods, "differences": diffs}
    return add_costs(summary, {0: folder})


def test_cost_section_holds_the_totals_and_the_words(tmp_path):
    summary = comparison(tmp_path)
    text = "\n".join(cost_section(summary))
    assert text.startswith("## Cost over the run")
    matu = summary["costs"]["methods"]["matu"]
    assert matu["bytes_total"] == 3 * 200 + 6 + 12 and matu["rounds"] == 3
    assert "| **matu** | 0.700 | 0.800 | - |" in text
    assert "| tall_masks | 0.600 | 0.700 | +0.100 [+0.040, +0.160] |" in text
    assert summary["costs"]["sentences"] and all(s in text for s in summary["costs"]["sentences"])
    assert cost_section({"seeds": [0]}) == []  # a summary without costs gets no section


def test_words_name_the_cheaper_method_when_accuracy_does_not_separate_them(tmp_path):
    summary = comparison(tmp_path)
    words = costs_in_words(summary)
    assert "so MaTU is the better choice on these numbers: per_task_fedavg needs 3.9" in words[1]
    swapped = copy.deepcopy(summary)
    m = swapped["costs"]["methods"]
    m["matu"], m["per_task_fedavg"] = m["per_task_fedavg"], m["matu"]
    assert "so per_task_fedavg is the better choice on these numbers: MaTU needs 3.9" in costs_in_words(swapped)[1]


def test_words_follow_the_interval_against_the_one_shot_merger(tmp_path):
    summary = comparison(tmp_path)
    ahead = costs_in_words(summary)[3]
    assert ahead.startswith("MaTU is more accurate and pays with rounds") and "Choose tall_masks for clients" in ahead
    behind = copy.deepcopy(summary)
    behind["differences"]["tall_masks"]["normalised"] = interval(-0.10, -0.16, -0.04)
    assert costs_in_words(behind)[3].startswith("tall_masks is more accurate with a single exchange")
    tied = copy.deepcopy(summary)
    tied["differences"]["tall_masks"]["normalised"] = interval(0.01, -0.03, 0.05)
    assert "With a fixed task set tall_masks is the better choice" in costs_in_words(tied)[3]


def test_claim_two_is_tested_against_individual_with_its_interval(tmp_path):
    summary = comparison(tmp_path)
    claim = costs_in_words(summary)[-1]
    assert "MaTU - individual = -0.200 [-0.310, -0.110] normalised" in claim
    assert "falls short of per-task fine-tuning" in claim
    assert "per_task_fedavg, which never unifies task vectors, is 0.180 below individual too (90%" in claim
    summary["differences"]["individual"]["normalised"] = interval(-0.02, -0.06, 0.02)
    assert "comparable to per-task fine-tuning" in costs_in_words(summary)[-1]


def test_committed_costs_refuses_a_file_without_costs(tmp_path):
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"seeds": [0]}))
    with pytest.raises(ValueError, match="has no 'costs'; regenerate it"):
        costs.committed_costs(path)


def test_the_cost_section_can_be_split_from_a_results_file_and_left_out(tmp_path):
    summary = comparison(tmp_path)
    text = "# Title\n\nseed table\n\n" + "\n".join(cost_section(summary)) + "\n## Per task\n\nrows\n"
    rest, section = costs.split_cost_section(text)
    assert section.startswith("## Cost over the run") and "## Per task" not in section
    assert rest == "# Title\n\nseed table\n\n## Per task\n\nrows\n"
    assert cost_section(costs.without_costs(summary)) == [] and "costs" in summary


def test_committed_costs_name_the_setup_they_describe(tmp_path):
    summary = comparison(tmp_path) | {"config": {"preset": "cpu", "rounds": 3, "model": "m"}}
    path = tmp_path / "cpu.json"
    path.write_text(json.dumps(summary))
    same = costs.committed_cost_markdown([tmp_path / "none.json", path], {"preset": "cpu", "rounds": 3, "model": "m"})
    assert same.startswith("**Committed: seeds 0** (`cpu.json`)") and "| **matu** |" in same
    other = costs.committed_cost_markdown([path], {"preset": "smoke", "rounds": 2, "model": "m"})
    assert other.startswith("(`cpu.json` is the `cpu` preset's comparison: preset, rounds differ from this run's")
    assert "| **matu** |" in other
    assert costs.committed_cost_markdown([tmp_path / "none.json"], {}).startswith("(no committed multi-seed results")


def test_claim_two_reads_a_summary_without_costs(tmp_path):
    summary = costs.without_costs(comparison(tmp_path))
    claim = costs.claim_two(summary)
    assert claim.startswith("Claim (2) against per-task fine-tuning on pooled data (`individual`): MaTU - individual")
    assert "-0.200 [-0.310, -0.110] normalised" in claim


def test_a_config_without_the_budget_fields_is_one_clear_error():
    with pytest.raises(ValueError, match="config.json field 'local_steps' is None"):
        client_steps("matu", {"rounds": 3}, iterative_history(10, 10))
