"""``run_flower``: the whole federation on Flower's simulation engine (Ray), from Python or a notebook.

    from matu_lib.flower import run_flower
    result = run_flower(preset("smoke"), "matu", out="results/smoke/flower-matu")

Same result type and results folder as ``federation.run``. Node ``partition-id`` k (assigned by the
simulation engine, 0..n_clients-1) is project client k; the server learns the node ids by a handshake.

Cleanup: Ray starts background processes (gcs_server, raylet, dashboard/monitor helpers, workers that
host the ClientApp actors). Everything Ray writes goes to a fresh temporary folder (``ray.init(_temp_dir=...)``,
``RAY_TMPDIR``, ``FLWR_HOME``). A watcher records the PID of every process started during the run (new
descendants of this process, and anything naming the temporary folder); when the run ends, also on error
or KeyboardInterrupt or SIGTERM, the ServerApp thread is told to stop (``server_app.StoppableGrid``),
``ray.shutdown()`` is called if Flower has not done it, and every recorded PID still alive is sent SIGTERM,
then SIGKILL after a grace period. ``result.flower["pids"]`` lists them (tests check that none is left).

Signals: ``ray.init`` replaces the SIGTERM handler twice (a Python one that exits with status 15, then Ray's C++
failure handler, which aborts the process with a stack dump), so ``run_flower`` starts Ray itself, takes that
exit during the start-up as SIGTERM, and puts its own SIGINT and SIGTERM handlers back right after
(``_StopSignals``). Either signal stops the ServerApp thread and raises in the main thread (SIGINT through the
caller's handler, Python's ``KeyboardInterrupt``; SIGTERM as ``Terminated``), which runs the clean-up above;
then ``KeyboardInterrupt`` propagates (a script ends as killed by SIGINT, status 130 in a shell) and SIGTERM
is raised again under the caller's handler (by default the process ends as killed by SIGTERM, status 143).
The rounds already finished stay in ``metrics.jsonl``; a Flower run keeps no checkpoint, so a rerun with
``resume=True`` starts again at round 1.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch

from ..federation import RunResult
from ..presets import RunConfig
from ..results_folder import folder_config, prepare_folder


@dataclass
class FlowerRunResult(RunResult):
    """``federation.RunResult`` plus what only a Flower run has (node map, wire bytes, PIDs cleaned up)."""

    flower: dict = field(default_factory=dict)


class _ProcessWatch:
    """Records the PIDs of every descendant of this process while Flower/Ray runs.

    Snapshots are needed *during* the run: Flower calls ``ray.shutdown()`` itself when the simulation ends,
    after which Ray actors are re-parented to init (no longer our descendants) and renamed
    ``ray::ClientAppActor`` (their command line no longer names the temp folder), yet may live on.
    """

    def __init__(self, tmp: str, interval: float = 0.5) -> None:
        self.tmp, self.interval = tmp, interval
        self.before = {p.pid for p in psutil.Process().children(recursive=True)}
        self.procs: dict[int, psutil.Process] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="matu-flwr-pidwatch", daemon=True)

    def __enter__(self) -> _ProcessWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.snapshot()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.snapshot()

    def snapshot(self) -> None:
        """Add new descendants, and any process whose command line names our temp folder."""
        try:
            for p in psutil.Process().children(recursive=True):
                if p.pid not in self.before:
                    self.procs.setdefault(p.pid, p)
        except psutil.Error:
            pass
        for p in psutil.process_iter(["cmdline"]):
            try:
                if p.pid != os.getpid() and any(self.tmp in part for part in (p.info["cmdline"] or [])):
                    self.procs.setdefault(p.pid, p)
            except psutil.Error:
                continue


def stop_processes(procs: list[psutil.Process], grace: float = 5.0) -> None:
    """SIGTERM each process by PID, wait ``grace`` seconds, SIGKILL what is left, and reap."""
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=grace)


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived during ``run_flower``; raised in the main thread so the clean-up runs as for Ctrl-C."""


class _StopSignals:
    """SIGINT and SIGTERM while ``run_flower`` runs: set ``stop`` (the ServerApp thread stops waiting and
    writes no further round), then raise in the main thread, so both run the same clean-up.

    SIGINT goes on to the caller's handler (Python's raises ``KeyboardInterrupt``); SIGTERM raises
    ``Terminated``. ``install`` (again after ``ray.init``, which replaces SIGTERM's handler); ``defer`` during
    the clean-up, when a further signal is remembered rather than raised (it would cut the clean-up short);
    ``restore`` gives the caller's handlers back and raises there a SIGTERM received (by default the process
    then ends with status 143) and a SIGINT that was only remembered. A signal the caller ignores stays
    ignored. Outside the main thread nothing is done (Python runs signal handlers only there).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, stop: threading.Event) -> None:
        self.stop = stop
        self.active = threading.current_thread() is threading.main_thread()
        self.previous = {s: signal.getsignal(s) for s in self.SIGNALS} if self.active else {}
        self.pending: set[int] = set()  # signals still to deliver to the caller's handlers at ``restore``
        self.deferred = False

    def _handler(self, signum: int, frame: object) -> None:
        self.stop.set()
        if signum == signal.SIGTERM or self.deferred:
            self.pending.add(signum)
        if self.deferred:
            return
        if signum == signal.SIGTERM:
            raise Terminated(f"signal {signum} (SIGTERM)")
        previous = self.previous[signum]
        if callable(previous):
            previous(signum, frame)
        else:
            raise KeyboardInterrupt

    def install(self) -> None:
        for s, previous in self.previous.items():
            signal.signal(s, signal.SIG_IGN if previous == signal.SIG_IGN else self._handler)

    def defer(self) -> None:
        self.deferred = True

    def restore(self) -> None:
        if not self.active:
            return
        for s, previous in self.previous.items():
            signal.signal(s, signal.SIG_DFL if previous is None else previous)
        for s in sorted(self.pending, reverse=True):  # SIGTERM first: it ends the process by default
            signal.raise_signal(s)


def _start_ray(init_args: dict) -> None:
    """``ray.init`` as Flower's Ray backend calls it (which then skips its own), without touching ``os.environ``.

    Starting Ray here, in the caller's thread, lets ``run_flower`` take SIGTERM back from Ray right after.
    """
    import ray

    pythonpath = os.pathsep.join(sys.path + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, **init_args)


def run_flower(
    cfg: RunConfig,
    method: str = "matu",
    out: str | Path | None = None,
    reference: dict[str, float] | None = None,
    num_cpus: int = 1,
    client_cpus: float = 1,
    torch_threads: int | None = 1,
    verbose: bool = False,
    resume: bool = False,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> FlowerRunResult:
    """Run ``method`` (any of ``FLOWER_METHODS``: the iterative methods) on ``cfg`` with ``cfg.n_clients``
    simulated SuperNodes.

    ``num_cpus`` is what Ray may use; ``client_cpus`` per ClientApp sets how many run at once (default 1 and 1:
    one Ray actor, cheapest on a small machine; 4 and 1 give four).

    ``torch_threads`` pins torch's thread count in the ClientApps (``MATU_TORCH_THREADS``) and, for the
    duration of the call, in this process, where the ServerApp aggregates. Float reductions (training,
    similarity, unification) depend on the thread count in their last bits, so results are bit-identical
    to an in-process ``federation.run`` under ``torch.set_num_threads(torch_threads)``; with another thread
    count they agree only to float rounding (accuracies usually still equal). ``None`` leaves threads alone.
    """
    import ray
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from .client_app import app as client_app
    from .server_app import run_strategy

    if ray.is_initialized():
        raise RuntimeError("Ray is already running in this process; run_flower starts (and stops) its own")
    if out is not None:  # folder rules checked before Ray starts: a refusal or a finished run costs no processes
        folder = Path(out)
        if prepare_folder(folder, folder_config(cfg, method), resume, overwrite):
            saved = json.loads((folder / "metrics.json").read_text())
            log(f"flower {method}: reusing finished run in {folder}")
            return FlowerRunResult(method, saved["history"], saved["final"], folder, flower={"reused": True})
    tmp = tempfile.mkdtemp(prefix="matu-flwr-")  # short path: Ray's unix sockets live under it
    env_keys = ("FLWR_HOME", "RAY_TMPDIR", "MATU_TORCH_THREADS", "FLWR_TELEMETRY_ENABLED", "RAY_USAGE_STATS_ENABLED")
    saved_env = {k: os.environ.get(k) for k in env_keys}
    os.environ["FLWR_HOME"] = os.path.join(tmp, "flwr")
    os.environ["RAY_TMPDIR"] = tmp
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if torch_threads is not None:
        os.environ["MATU_TORCH_THREADS"] = str(torch_threads)
    box: dict = {}
    server_app = ServerApp()
    watch = _ProcessWatch(tmp)
    stop = threading.Event()  # set when this call ends: the ServerApp thread stops waiting for clients

    @server_app.main()
    def _main(grid, context) -> None:  # closure: the result stays in this process (ServerApp runs in a thread)
        box["thread"] = threading.current_thread()
        try:
            box["result"] = run_strategy(grid, cfg, method, out, reference, log=log, resume=True, stop=stop)
        finally:
            watch.snapshot()  # Ray is still fully up here: every actor is still our descendant

    backend_config = {
        "init_args": {
            "num_cpus": num_cpus,
            "num_gpus": 0,
            "_temp_dir": tmp,
            "include_dashboard": False,
            "logging_level": "WARNING",
            "log_to_driver": verbose,
        },
        "client_resources": {"num_cpus": client_cpus, "num_gpus": 0.0},
    }
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    if torch_threads is not None:
        torch.set_num_threads(torch_threads)
    # SIGTERM (a scheduler, `kill`) must run the same clean-up as Ctrl-C, or Ray's processes outlive us
    signals = _StopSignals(stop)
    signals.install()
    try:
        with watch:
            try:
                _start_ray(backend_config["init_args"])
            except SystemExit as err:  # SIGTERM met the handler ray.init installs first: sys.exit(SIGTERM)
                if err.code != signal.SIGTERM or not signals.active:
                    raise
                signals.pending.add(signal.SIGTERM)
                raise Terminated("signal 15 (SIGTERM) during Ray's start-up") from None
            signals.install()  # ray.init replaced SIGTERM's handler (in Python, then in C++): take it back
            run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=cfg.n_clients,
                backend_config=backend_config,
                verbose_logging=verbose,
            )
    finally:
        signals.defer()
        stop.set()
        try:
            if ray.is_initialized():  # Flower shuts Ray down on success; not always on error
                ray.shutdown()
        finally:
            server = box.get("thread")
            if server is not None:
                server.join(timeout=10)  # it stops at its next wait for clients (within 0.1 s of one)
            torch.set_num_threads(threads)
            watch.snapshot()
            stop_processes(list(watch.procs.values()))
            for k, v in saved_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            shutil.rmtree(tmp, ignore_errors=True)
            signals.restore()  # last: a SIGTERM received goes on to the caller's handler
    if "result" not in box:
        raise RuntimeError("the Flower run finished without a result (see the log above)")
    res, stats = box["result"]
    stats |= {"pids": sorted(watch.procs), "seconds": round(time.perf_counter() - t0, 1), "temp_dir": tmp}
    return FlowerRunResult(res.method, res.history, res.final, res.folder, flower=stats)
