"""The workbook's plumbing: ordered notebooks, headless execution with papermill, shared artefacts.

    python -m matu_lib.workbook --preset cpu                              # `make demo-full` (`make demo`: -p subsets)
    python -m matu_lib.workbook --check data/references/smoke.json        # regression run: exit 1 on drift
    python -m matu_lib.workbook --preset smoke -p OVERRIDES '{"rounds": 1}' --record ref.json
    python -m matu_lib.workbook --only 04_federated_run -p OVERRIDES '{"transfer": True}'   # any RunConfig field

executes every notebook in order into ``results/workbook/<preset>/`` (gitignored) with a progress line
(cells done, elapsed, time left from the reference timings), exports one HTML page per notebook plus an
index (``report.py``), prints the headline table and, with ``--check``, the metrics that drifted from a
stored reference (``regression.py``). Notebooks report through files:
each writes ``metrics.json`` (and figures) into its ``OUTPUT_DIR``; later notebooks reuse what earlier
ones saved (task vectors, finished runs) from ``SHARED_DIR`` and recompute it when it is missing, so
every notebook also runs on its own.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import time
from pathlib import Path

from .backbones import repo_root
from .notebook import default_results_dir
from .regression import REFERENCE_DIR  # committed references, one per preset (timings, metrics)

NOTEBOOK_DIR = repo_root() / "notebooks"
NOTEBOOKS = (
    "00_quickstart",
    "01_task_vector_geometry",
    "02_task_similarity",
    "03_modulators",
    "04_federated_run",
    "05_ablations",
    "06_communication",
)


# ------------------------------------------------------------------------------------ notebook files


def parameters_cell(path: str | Path) -> dict:
    """The literal values of the notebook's single ``parameters`` cell (raises if there is not exactly one)."""
    nb = json.loads(Path(path).read_text())
    cells = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(cells) != 1:
        raise ValueError(f"{path}: expected exactly one cell tagged 'parameters', found {len(cells)}")
    source = "".join(cells[0]["source"])
    values = {}
    for node in ast.parse(source).body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            raise ValueError(f"{path}: the parameters cell may only assign flat literals (found {ast.dump(node)[:60]})")
        values[node.targets[0].id] = ast.literal_eval(node.value)  # raises on anything derived
    return values


def has_outputs(path: str | Path) -> bool:
    nb = json.loads(Path(path).read_text())
    return any(c.get("outputs") or c.get("execution_count") for c in nb["cells"] if c["cell_type"] == "code")


# ------------------------------------------------------------------------------------------ parameters

RESERVED = {"PRESET": "--preset", "SEED": "--seed", "OUTPUT_DIR": "--out", "SHARED_DIR": "--out"}


def parse_value(raw: str):
    """A ``-p`` value as papermill reads it: a Python literal (2, 0.5, True, None, ['a', 'b']) or else a string."""
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def _type_ok(value, default) -> bool:
    if default is None:  # "None = use the preset's value": any literal can replace it
        return True
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    return isinstance(value, type(default))


def check_parameters(parameters: dict, names: tuple[str, ...]) -> dict[str, dict]:
    """Validate ``-p`` parameters against the notebooks' parameters cells; returns each notebook's share.

    Raises ValueError (one line) for a name that no selected notebook has, a name the workbook sets itself,
    or a value whose type differs from a notebook's default, so nothing runs with a silently ignored value.
    """
    cells = {n: parameters_cell(NOTEBOOK_DIR / f"{n}.ipynb") for n in names}
    for key, value in parameters.items():
        if key == "OVERRIDES":  # typed against RunConfig, as the notebooks' setup() will check it
            from .notebook import check_run_parameters
            from .presets import PRESETS

            try:
                check_run_parameters(next(iter(PRESETS)), 0, value)
            except (TypeError, KeyError, ValueError) as err:
                raise ValueError(f"-p OVERRIDES: {str(err).strip(chr(34))}") from None
        if key in RESERVED:
            raise ValueError(f"parameter {key} is set by the workbook; use {RESERVED[key]} instead of -p {key}")
        having = [n for n in names if key in cells[n]]
        if not having:
            known = sorted(set().union(*cells.values()) - set(RESERVED))
            raise ValueError(
                f"unknown notebook parameter {key!r}; the selected notebooks have {known} (PRESET, SEED "
                f"and the folders are set with --preset, --seed and --out)"
            )
        for n in having:
            if not _type_ok(value, cells[n][key]):
                default = repr(cells[n][key])
                raise ValueError(
                    f"parameter {key}={value!r} has type {type(value).__name__}, but {n} expects "
                    f"{type(cells[n][key]).__name__} (default {default if len(default) < 60 else default[:57] + '...'})"
                )
    return {n: {k: v for k, v in parameters.items() if k in cells[n]} for n in names}


def notebook_parameters(name: str, preset: str, seed: int, shared: str | Path, parameters: dict | None = None) -> dict:
    """What one notebook of a workbook run receives: PRESET, SEED, SHARED_DIR and its share of ``parameters``.

    The workbook and the notebook tests (which check their executions against ``data/references/smoke.json``)
    both call this, so a test execution and a ``--record`` run of the same reference get the same values.
    """
    cell = parameters_cell(NOTEBOOK_DIR / f"{name}.ipynb")
    params = {"PRESET": preset, "SEED": seed, "SHARED_DIR": str(Path(shared).resolve())}
    return {k: v for k, v in params.items() if k in cell} | {k: v for k, v in (parameters or {}).items() if k in cell}


# ------------------------------------------------------------------------------------------ execution


def _kernel_manager_class():
    """A kernel manager that talks to local kernels over Unix sockets instead of TCP on 127.0.0.1.

    ipykernel warns "Kernel is running over TCP without encryption" at every start of a TCP kernel; a local
    kernel needs no network port at all, and IPC sockets live in a private (0700) folder, so the warning's
    cause goes away instead of being hidden. The folder is a short temporary path because Unix socket paths
    are limited to ~107 bytes (the Jupyter runtime folder inside a deep checkout can exceed that).
    """
    import shutil
    import tempfile

    from jupyter_client.manager import KernelManager

    if os.name != "posix":
        return KernelManager

    class LocalIPCKernelManager(KernelManager):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.transport = "ipc"
            self._socket_dir = tempfile.mkdtemp(prefix="matu-kernel-")
            self.ip = os.path.join(self._socket_dir, "k")

        def cleanup_resources(self, restart: bool = False) -> None:
            super().cleanup_resources(restart=restart)
            if not restart:
                shutil.rmtree(self._socket_dir, ignore_errors=True)

    return LocalIPCKernelManager


def _count_cells(path: Path) -> int:
    return len(json.loads(path.read_text())["cells"])


def children_cpu_s() -> float:
    """CPU seconds (user + system) of this process's finished children: the kernels that have run so far."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def machine_state() -> dict:
    """What the machine was doing: CPU count and the 1/5/15-minute load averages (a busy machine inflates wall time)."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {"cpus": os.cpu_count(), "load_average": [round(x, 2) for x in load]}


def execute(
    name: str,
    output_dir: str | Path,
    parameters: dict | None = None,
    html: bool = False,
    timeout: int = 1800,
    on_cell=None,
    stats: dict | None = None,
) -> dict:
    """Run ``notebooks/<name>.ipynb`` headless; returns the ``metrics.json`` it wrote.

    Unknown parameter names are refused here (papermill would only warn and silently keep defaults).
    ``on_cell(done, total)`` is called after every cell, for progress displays. ``stats``, when given, receives
    ``wall_s`` and ``cpu_s``: the kernel's CPU seconds, which a busy machine inflates far less than wall time
    (with one thread, ``cpu_s`` is about what the notebook takes on an idle core).
    """
    import papermill
    from papermill.engines import NBClientEngine, papermill_engines

    source = NOTEBOOK_DIR / f"{name}.ipynb"
    params = dict(parameters or {})
    unknown = sorted(set(params) - set(parameters_cell(source)))
    if unknown:
        raise KeyError(
            f"{name}: no parameters named {unknown}; its parameters cell has {sorted(parameters_cell(source))}"
        )
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    params.setdefault("OUTPUT_DIR", str(output_dir.resolve()))
    executed = output_dir / f"{name}.ipynb"

    class Engine(NBClientEngine):
        @classmethod
        def execute_managed_notebook(cls, nb_man, kernel_name, **kwargs):
            if on_cell is not None:
                complete, done = nb_man.cell_complete, [0]

                def cell_complete(*args, **kw):
                    complete(*args, **kw)
                    done[0] += 1
                    on_cell(done[0], len(nb_man.nb.cells))

                nb_man.cell_complete = cell_complete
            return super().execute_managed_notebook(nb_man, kernel_name, **kwargs)

    papermill_engines.register("matu", Engine)
    env_before = os.environ.get("MATU_PROGRESS")
    os.environ.setdefault("MATU_PROGRESS", "0")
    cpu0, wall0 = children_cpu_s(), time.perf_counter()
    try:
        papermill.execute_notebook(
            str(source),
            str(executed),
            parameters=params,
            kernel_name="python3",
            cwd=str(NOTEBOOK_DIR),
            progress_bar=False,
            execution_timeout=timeout,
            engine_name="matu",
            kernel_manager_class=_kernel_manager_class(),
        )
    finally:
        if env_before is None:
            os.environ.pop("MATU_PROGRESS", None)
    if stats is not None:
        stats |= {"wall_s": time.perf_counter() - wall0, "cpu_s": children_cpu_s() - cpu0}
    if html:
        export_html(executed)
    return json.loads((Path(params["OUTPUT_DIR"]) / "metrics.json").read_text())


def export_html(executed: Path) -> Path:
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_filename(str(executed))
    target = executed.with_suffix(".html")
    target.write_text(body)
    return target


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    """Cells done / total, elapsed time and an estimate of what is left, for a run of several notebooks.

    The estimate is the reference timings of the notebooks still to run, scaled by how fast this machine
    has been so far relative to the reference (1.0 before the first notebook ends). On a terminal the
    status line is rewritten in place every second; in a log (CI, ``make demo | tee``) one line is printed
    every ``log_every`` seconds, so a long cell never leaves the output silent.
    """

    def __init__(
        self, names: tuple[str, ...], reference_s: dict[str, float] | None = None, stream=None, log_every: float = 30.0
    ):
        import threading

        self.names, self.reference_s = names, dict(reference_s or {})
        self.stream = stream or sys.stdout
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.log_every = log_every
        self.done_s: dict[str, float] = {}
        self.current, self.cells, self.t0, self.t_all = None, (0, 0), 0.0, time.perf_counter()
        self._lock, self._stop, self._last_write = threading.Lock(), threading.Event(), time.perf_counter()
        self._thread = threading.Thread(target=self._tick, daemon=True)
        self._thread.start()

    def remaining_s(self) -> float | None:
        """Seconds left by the reference timings, scaled by the speed measured so far; None without timings."""
        if not self.reference_s or self.current is None:
            return None
        measured = [n for n in self.done_s if n in self.reference_s and self.reference_s[n] > 0]
        speed = sum(self.done_s[n] for n in measured) / sum(self.reference_s[n] for n in measured) if measured else 1.0
        todo = self.names[self.names.index(self.current) + 1 :]
        if any(n not in self.reference_s for n in todo + (self.current,)):
            return None
        current_left = max(0.0, self.reference_s[self.current] * speed - (time.perf_counter() - self.t0))
        return current_left + speed * sum(self.reference_s[n] for n in todo)

    def line(self) -> str:
        i = self.names.index(self.current) + 1
        done, total = self.cells
        left = self.remaining_s()
        eta = "" if left is None else f", about {_clock(left)} left in all"
        return (
            f"[{i}/{len(self.names)}] {self.current}: cell {done}/{total}, "
            f"{_clock(time.perf_counter() - self.t0)} elapsed{eta}"
        )

    def _write(self, text: str, final: bool = False) -> None:
        self._last_write = time.perf_counter()
        if self.tty:
            self.stream.write("\r\033[K" + text + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def _tick(self) -> None:
        while not self._stop.wait(1.0):
            with self._lock:
                if self.current is None:
                    continue
                if self.tty or time.perf_counter() - self._last_write >= self.log_every:  # a log: quiet between lines
                    self._write(self.line())

    def start(self, name: str, total_cells: int) -> None:
        with self._lock:
            self.current, self.cells, self.t0 = name, (0, total_cells), time.perf_counter()
            self._write(self.line(), final=False)

    def cell(self, done: int, total: int) -> None:
        with self._lock:
            self.cells = (done, total)
            if self.tty:
                self._write(self.line())

    def finish(self, name: str) -> float:
        with self._lock:
            seconds = time.perf_counter() - self.t0
            self.done_s[name] = seconds
            i = self.names.index(name) + 1
            self._write(f"[{i}/{len(self.names)}] {name} done in {_clock(seconds)}", final=True)
            self.current = None
            return seconds

    def close(self) -> float:
        self._stop.set()
        self._thread.join()
        return time.perf_counter() - self.t_all


def run_all(
    preset: str = "cpu",
    out: str | Path | None = None,
    seed: int = 0,
    names: tuple[str, ...] = NOTEBOOKS,
    parameters: dict | None = None,
    reference_s: dict[str, float] | None = None,
    log_every: float = 30.0,
) -> dict:
    """Execute the notebooks in order (the main job) with visible progress.

    Returns ``{"metrics": {name: metrics.json}, "timings_s": {...}, "cpu_s": {...}, "cells": {...}, "total_s": ...,
    "machine": {"start": ..., "end": ...}, "out": Path}`` (``machine_state`` before and after).
    ``parameters`` are ``-p`` values, checked against every notebook's parameters cell before anything runs.
    """
    out = Path(out or default_results_dir() / "workbook" / preset)
    shared = out / "shared"
    per_notebook = check_parameters(dict(parameters or {}), names)
    progress = Progress(names, reference_s, log_every=log_every)
    metrics, timings, cells, cpu, start = {}, {}, {}, {}, machine_state()
    try:
        for name in names:
            source = NOTEBOOK_DIR / f"{name}.ipynb"
            params = notebook_parameters(name, preset, seed, shared, per_notebook[name])
            cells[name] = _count_cells(source) + 1
            progress.start(name, cells[name])
            stats = {}
            metrics[name] = execute(name, out / name, params, html=True, on_cell=progress.cell, stats=stats)
            timings[name], cpu[name] = progress.finish(name), stats["cpu_s"]
    finally:
        total = progress.close()
    return {
        "metrics": metrics,
        "timings_s": timings,
        "cpu_s": cpu,
        "cells": cells,
        "total_s": total,
        "machine": {"start": start, "end": machine_state()},
        "out": out,
    }


FOLDER_PARAMETERS = ("OUTPUT_DIR", "SHARED_DIR")  # where a notebook wrote, not what it computed


def ran_with(executed: Path, name: str) -> dict | None:
    """What notebook ``name`` ran with, from papermill's record in its executed copy: every parameter of its
    parameters cell, defaults filled in, without the folders; None when the copy holds no such record."""
    nb = json.loads(Path(executed).read_text())
    passed = nb.get("metadata", {}).get("papermill", {}).get("parameters")
    if not isinstance(passed, dict):
        return None
    values = parameters_cell(NOTEBOOK_DIR / f"{name}.ipynb") | passed
    return {k: v for k, v in json.loads(json.dumps(values)).items() if k not in FOLDER_PARAMETERS}


def check_ran_with(out: Path, name: str, expected: dict) -> None:
    """Refuse (ValueError, one line) a finished notebook whose run had another preset, seed or parameters than
    ``expected`` (``notebook_parameters``): its numbers would be reported, checked or recorded as another run's."""
    executed = Path(out) / name / f"{name}.ipynb"
    recorded = ran_with(executed, name)
    if recorded is None:
        raise ValueError(
            f"--reuse: {executed} has no papermill record of its parameters, so what it ran with is "
            f"unknown; run it again without --reuse"
        )
    wanted = parameters_cell(NOTEBOOK_DIR / f"{name}.ipynb") | expected
    wanted = {k: v for k, v in json.loads(json.dumps(wanted)).items() if k not in FOLDER_PARAMETERS}
    differ = sorted(k for k in set(recorded) | set(wanted) if recorded.get(k, _UNSET) != wanted.get(k, _UNSET))
    if differ:
        k = differ[0]
        raise ValueError(
            f"--reuse: {out / name} ran with {k}={recorded.get(k, 'unset')!r}, this command asks for "
            f"{k}={wanted.get(k, 'unset')!r}"
            + (f" (and {differ[1:]} differ too)" if differ[1:] else "")
            + "; the numbers would not be this run's: choose the matching --out, or run without --reuse"
        )


def load_finished(out: str | Path, names: tuple[str, ...], expected: dict[str, dict] | None = None) -> dict:
    """A finished run read back from ``out`` (as ``run_all`` returns it), for ``--reuse``: nothing is executed.

    Timings come from papermill's record in each executed notebook. Raises ValueError naming the first
    notebook that has no executed copy or no ``metrics.json``, or (with ``expected``, each notebook's
    ``notebook_parameters``) that ran with other parameters (``check_ran_with``).
    """
    out = Path(out)
    metrics, timings, cells = {}, {}, {}
    for name in names:
        executed, metrics_file = out / name / f"{name}.ipynb", out / name / "metrics.json"
        if not executed.exists() or not metrics_file.exists():
            raise ValueError(f"--reuse: {out / name} holds no finished run of {name} (run without --reuse first)")
        if expected is not None:
            check_ran_with(out, name, expected[name])
        nb = json.loads(executed.read_text())
        timings[name] = float(nb.get("metadata", {}).get("papermill", {}).get("duration") or 0.0)
        cells[name] = len(nb["cells"])
        metrics[name] = json.loads(metrics_file.read_text())
    return {"metrics": metrics, "timings_s": timings, "cells": cells, "total_s": sum(timings.values()), "out": out}


_UNSET = object()


def run_config(preset_name: str, seed: int, overrides: dict, runnable: bool = True):
    """The config every notebook will resolve, checked before the first notebook starts: values for range and, with
    ``runnable``, what this machine must have (device, model, weights file, a partition that can be built), so a
    value that cannot run is one line here rather than a traceback from inside a notebook."""
    from .notebook import check_run_parameters
    from .presets import check_runnable
    from .presets import preset as resolve

    cfg = resolve(preset_name, seed=seed, **check_run_parameters(preset_name, seed, overrides))
    if runnable:
        check_runnable(cfg)
    return cfg


def check_record_path(path: Path) -> None:
    """Refuse a ``--record`` path that cannot be written before the run, not after it."""
    if path.is_dir():
        raise IsADirectoryError(f"--record: {path} is a folder; give a file path such as {path / 'ref.json'}")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise NotADirectoryError(f"--record: {parent} is a file, not a folder; choose another --record path")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise PermissionError(f"--record: cannot write to {parent}; choose another --record path")
            return


def _committed_reference(preset: str) -> dict:
    """The preset's committed reference (for its timings), or {} when there is none."""
    from . import regression

    try:
        return regression.load_reference(REFERENCE_DIR / f"{preset}.json")
    except ValueError:
        return {}


def main(argv: list[str] | None = None) -> int:
    from . import regression, report

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=None, help="default: the checked reference's preset, else cpu")
    parser.add_argument("--seed", type=int, default=None, help="default: the checked reference's seed, else 0")
    parser.add_argument("--out", type=Path, default=None, help="default: results/workbook/<preset>")
    parser.add_argument("--only", nargs="+", default=None, help="run only these notebooks (names)")
    parser.add_argument(
        "-p",
        "--parameter",
        nargs=2,
        action="append",
        default=[],
        metavar=("NAME", "VALUE"),
        help="a notebook parameter, as papermill's -p (repeatable); VALUE is a Python literal or a string",
    )
    parser.add_argument(
        "--check",
        type=Path,
        default=None,
        metavar="REFERENCE",
        help="compare every notebook's metrics with this reference; exit 1 on drift",
    )
    parser.add_argument("--record", type=Path, default=None, metavar="PATH", help="write a new reference here")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="run nothing: read the finished notebooks in --out (to check or record them again)",
    )
    args = parser.parse_args(argv)

    def fail(message: str) -> int:
        print(f"error: {message}", file=sys.stderr)
        return 2

    names = tuple(args.only) if args.only else NOTEBOOKS
    missing = [n for n in names if not (NOTEBOOK_DIR / f"{n}.ipynb").exists()]
    if missing:
        return fail(f"no such notebooks: {missing}; the workbook has {list(NOTEBOOKS)}")
    parameters = {k: parse_value(v) for k, v in args.parameter}
    reference = None
    if args.check:
        try:
            reference = regression.load_reference(args.check)
        except ValueError as err:
            return fail(str(err))
        # a check compares like with like: the reference's preset, seed and parameters unless stated otherwise
        for flag, mine, theirs in (
            ("--preset", args.preset, reference["preset"]),
            ("--seed", args.seed, reference["seed"]),
        ):
            if mine is not None and mine != theirs:
                return fail(
                    f"{flag} {mine} differs from the reference's {theirs!r} ({args.check}); the numbers would not be "
                    "comparable"
                )
        for key, value in parameters.items():
            if reference["parameters"].get(key, _UNSET) != value:
                theirs = reference["parameters"].get(key, "unset")
                return fail(
                    f"-p {key} {value!r} differs from the reference's {theirs!r} ({args.check}); the numbers would "
                    "not be comparable"
                )
        # with --only, the reference's parameters of notebooks that do not run are not passed
        selected = set().union(*(parameters_cell(NOTEBOOK_DIR / f"{n}.ipynb") for n in names))
        parameters = {k: v for k, v in reference["parameters"].items() if k in selected}
    preset = args.preset or (reference or {}).get("preset") or "cpu"
    seed = args.seed if args.seed is not None else (reference or {}).get("seed", 0)
    from .presets import PRESETS, long_run_warning

    if preset not in PRESETS:
        return fail(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    try:
        check_parameters(parameters, names)
        cfg = run_config(preset, seed, parameters.get("OVERRIDES", {}), runnable=not args.reuse)
        if args.record:
            check_record_path(args.record)
    except (TypeError, KeyError, ValueError, OSError) as err:
        return fail(str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err))
    warning = None if args.reuse else long_run_warning(cfg)
    if warning:
        print(warning, file=sys.stderr, flush=True)

    timing_ref = reference or _committed_reference(preset)
    print(
        f"workbook: preset {preset}, seed {seed}, {len(names)} notebooks"
        + (f", parameters {parameters}" if parameters else "")
        + (
            f"; reference timings from {timing_ref.get('recorded_at', '?')} "
            f"({sum(timing_ref['timings_s'].values()) / 60:.0f} min in all)"
            if timing_ref.get("timings_s")
            else ""
        ),
        flush=True,
    )
    if args.reuse:
        folder = args.out or default_results_dir() / "workbook" / preset
        per_notebook = check_parameters(parameters, names)
        expected = {n: notebook_parameters(n, preset, seed, folder / "shared", per_notebook[n]) for n in names}
        try:
            result = load_finished(folder, names, expected)
        except (OSError, ValueError) as err:
            return fail(str(err))
    else:
        result = run_all(preset, args.out, seed, names, parameters, timing_ref.get("timings_s"))
    out = result["out"]

    check = None
    if reference is not None:
        rows = regression.compare(reference, result["metrics"])
        check = {"reference": str(args.check), "summary": regression.summary(rows), "rows": rows}
        (out / "regression.md").write_text(regression.table(rows) + "\n")
    if args.record:
        ref = regression.make_reference(
            result["metrics"],
            preset=preset,
            seed=seed,
            parameters=parameters,
            timings=result["timings_s"],
            cells=result["cells"],
            cpu=result.get("cpu_s"),
            machine=result.get("machine"),
        )
        args.record.parent.mkdir(parents=True, exist_ok=True)
        args.record.write_text(json.dumps(ref, indent=1) + "\n")
    index = report.write_index(out, result, preset=preset, seed=seed, parameters=parameters, check=check)

    headline = result["metrics"].get("04_federated_run", {}).get("table_markdown")
    if headline:
        print("\nHeadline (test splits; normalised = (accuracy - chance) / (individual - chance), per task):")
        print(headline)
    from .expectations import summarise_folder, summary_line

    expected = summarise_folder(out, tuple(result["metrics"]))
    if expected:
        print(
            "\nexpectations (what each notebook said a run should show, checked): "
            + "; ".join(f"{n[:2]}: {summary_line(c)}" for n, c in expected.items())
        )
    print(
        f"\nworkbook finished in {_clock(result['total_s'])} ("
        + ", ".join(f"{n[:2]}: {_clock(t)}" for n, t in result["timings_s"].items())
        + ")"
    )
    if result.get("cpu_s"):
        m = result["machine"]
        print(
            f"kernel CPU time {_clock(sum(result['cpu_s'].values()))} ("
            + ", ".join(f"{n[:2]}: {_clock(t)}" for n, t in result["cpu_s"].items())
            + f"); load average {m['start']['load_average'][0]} at the start, {m['end']['load_average'][0]} at the "
            "end, "
            f"{m['start']['cpus']} CPUs"
        )
    if args.record:
        print(f"reference written: {args.record}")
    status = 0
    if check is not None:
        failed = [r for r in check["rows"] if r.failed]
        print(f"\nregression check: {regression.verdict(check['rows'], str(args.check))}")
        if failed:
            print(regression.table(failed))
            status = 1
        print(f"full table: {out / 'regression.md'}")
    print(f"report: {index}")
    return status


if __name__ == "__main__":
    sys.exit(main())
