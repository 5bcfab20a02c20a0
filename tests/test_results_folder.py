"""A results folder is bound to its config and written by one process at a time.

The checkpoint and ``metrics.json`` carry the config's identity: a file from another config is refused in one
line; a finished run is reused only when its metrics are complete. A writer holds an OS file lock on the folder:
a second writer, and ``--overwrite``, are refused while the holder lives, and the lock dies with its process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from matu_lib import federation, results_folder
from matu_lib.federation import build_context, run
from matu_lib.presets import preset
from matu_lib.results_folder import CheckpointError, FolderBusy

TINY = {
    "model": "matu-micro",
    "pretrained": None,
    "rounds": 2,
    "local_steps": 1,
    "max_train_per_task": 64,
    "eval_batch_size": 256,
}


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def ctx():
    return build_context(preset("smoke", **TINY), log=quiet)


@pytest.fixture(scope="module")
def other(ctx):
    """The same clients and data under another config (a field that names the run without changing its numbers)."""
    return replace(ctx, cfg=replace(ctx.cfg, eval_batch_size=128))


def test_checkpoint_from_another_config_is_refused(ctx, other, tmp_path):
    run(ctx, "matu", tmp_path / "a", stop_after=1, log=quiet)
    run(other, "matu", tmp_path / "b", stop_after=1, log=quiet)
    ck = Path("checkpoint") / results_folder.CHECKPOINT_FILE
    shutil.copy(tmp_path / "a" / ck, tmp_path / "b" / ck)
    with pytest.raises(CheckpointError, match="belongs to another config") as err:
        run(other, "matu", tmp_path / "b", resume=True, log=quiet)
    assert "\n" not in str(err.value) and "--overwrite" in str(err.value)
    assert run(ctx, "matu", tmp_path / "a", resume=True, log=quiet).final["rounds"] == 2  # its own config resumes


def test_metrics_from_another_config_are_never_reused(ctx, other, tmp_path):
    run(ctx, "zero_shot", tmp_path / "a", log=quiet)
    run(other, "zero_shot", tmp_path / "b", log=quiet)
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["config_id"] == results_folder.config_id(
        results_folder.folder_config(ctx.cfg, "zero_shot")
    )
    shutil.copy(tmp_path / "a" / "metrics.json", tmp_path / "b" / "metrics.json")
    with pytest.raises(CheckpointError, match="written by another config") as err:
        run(other, "zero_shot", tmp_path / "b", resume=True, log=quiet)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "saved",
    [
        {"history": [], "final": {}},
        {"method": "zero_shot", "history": [{"round": 1}], "final": {}},
        {
            "method": "zero_shot",
            "history": [{"round": 1}, {"round": 2}],
            "final": {"acc": {}, "mean_acc": 0.5, "rounds": 1},
        },
        {"method": "fedavg", "history": [{"round": 1}], "final": {"acc": {}, "mean_acc": 0.5, "rounds": 1}},
    ],
)
def test_incomplete_or_foreign_metrics_are_refused_not_reused(ctx, tmp_path, saved):
    folder = tmp_path / "zs"
    run(ctx, "zero_shot", folder, log=quiet)
    (folder / "metrics.json").write_text(json.dumps(saved))
    with pytest.raises(CheckpointError, match="incomplete|holds method") as err:
        run(ctx, "zero_shot", folder, resume=True, log=quiet)
    assert "\n" not in str(err.value)


def test_finished_run_without_config_id_is_reused_by_its_config_json(ctx, tmp_path):
    """A finished run written before the files carried the identity is still judged by its ``config.json``."""
    folder = tmp_path / "zs"
    first = run(ctx, "zero_shot", folder, log=quiet)
    saved = json.loads((folder / "metrics.json").read_text())
    del saved["config_id"]
    (folder / "metrics.json").write_text(json.dumps(saved))
    assert run(ctx, "zero_shot", folder, resume=True, log=quiet).final == json.loads(json.dumps(first.final))


HOLD = (
    "import sys; from pathlib import Path; from matu_lib.results_folder import lock_folder; "
    "lock_folder(Path(sys.argv[1])); print('locked', flush=True); sys.stdin.readline()"
)


def _holder(folder: Path) -> subprocess.Popen:
    """A second process that holds ``folder``'s writer lock until its stdin closes or it is killed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "locked"  # also shows that the run before it released the lock
    return proc


def test_second_writer_and_overwrite_are_refused_while_the_holder_lives(ctx, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "zs"
    first = run(ctx, "zero_shot", folder, log=quiet)
    proc = _holder(folder)
    try:
        for kwargs in ({"resume": True}, {"overwrite": True}):
            with pytest.raises(FolderBusy, match=f"being written by process {proc.pid}") as err:
                run(ctx, "zero_shot", folder, log=quiet, **kwargs)
            assert "\n" not in str(err.value)
        assert not list(tmp_path.glob("zs.*.bak")) and (folder / "metrics.json").exists()  # nothing moved
        from matu_lib.__main__ import main

        monkeypatch.setattr(federation, "build_context", lambda *a, **k: pytest.fail("work started"))
        for extra in ([], ["--overwrite"]):
            rc = main(["run", "--preset", "smoke", "--method", "zero_shot", "--out", str(folder), *extra])
            err = capsys.readouterr().err.strip()
            assert rc == 2 and f"being written by process {proc.pid}" in err and "\n" not in err
    finally:
        proc.kill()  # like kill -9: the lock dies with its process
        proc.wait()
    again = run(ctx, "zero_shot", folder, resume=True, log=quiet)
    assert again.final == json.loads(json.dumps(first.final))


def test_a_new_folder_is_locked_while_it_is_written(ctx, tmp_path, monkeypatch):
    """While rounds run the folder is held: another process probing it sees this process as the writer."""
    folder = tmp_path / "matu"
    seen = []

    def hook(name):
        if name == "checkpoint" and not seen:
            code = (
                "import sys; from pathlib import Path; from matu_lib.results_folder import folder_holder; "
                "print(folder_holder(Path(sys.argv[1])))"
            )
            probe = subprocess.run(
                [sys.executable, "-c", code, str(folder)], capture_output=True, text=True, check=True
            )
            seen.append(probe.stdout.strip())

    monkeypatch.setattr(results_folder, "CHECKPOINT_HOOK", hook)
    run(ctx, "matu", folder, log=quiet)
    assert seen == [str(os.getpid())]
