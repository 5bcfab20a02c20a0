"""Benchmark: one ``unify`` (EMR elect/mask/rescale) over N task vectors of P parameters, and one server round
(reconstruct every upload, average per task, re-unify per client) over the same number of vectors.

Prints the wall time of each, the peak memory, and the time of copying the same bytes once -- ``torch.clone`` of
each vector (allocation + copy) and ``copy_`` into one preallocated buffer (the pure memory-bandwidth floor any
streaming operator pays) -- with the ratio of each operator to the floor, and the memory each operator held beyond
its inputs and outputs against the budget of one slice per worker. The floor is timed twice over: the best of 3
copies at the start, and a copy of the operator's own input bytes right before each of its runs; the median of
those paired ratios is the figure to quote, as the floor alone varied by 20-30% from one minute to the next.

    make bench                                                # CI size: N=30, P=2M, both backends
    python benchmarks/bench_aggregation.py                   # N=30, P=88M (ViT-B/32): 10.6 GB of inputs
    python benchmarks/bench_aggregation.py --params 22000000 # N=30, P=22M: 2.6 GB of inputs
    python benchmarks/bench_aggregation.py --device cuda     # vectors and arithmetic on the GPU (torch form)
    (--threads sets torch's and numba's threads; on a shared machine fewer threads than cores keep timings steady)

The server round is measured on N/2 clients holding 2 tasks each (N (client, task) vectors in all), every task
held by two clients, uploads built by ``unify`` beforehand (not timed); the clients' own vectors are freed before
the round, so the held inputs are the uploads (tau_u + bool masks, as ``Payload`` carries them). Each backend
writes its downloads to new buffers; a last round writes them over the uploads (``aggregate(consume=True)``, for a
server that owns its decoded uploads), which skips allocating and first-touching 7.9 GB of new pages at P=88M.

Inputs are *held in memory*, as a client holds its task vectors: 30 x 88M float32 is 10.6 GB, which
fits a 24 GB machine; the script refuses to start when the inputs would exceed 60% of MemAvailable
rather than swap. Vectors are generated one at a time from a seeded generator (about 20% exact
zeros, like sparse fine-tuning updates), so no (tasks x params) stack is ever built. Masks are
returned bit-packed (the upload format, ``pack=True``); ``--unpacked`` returns bool masks instead.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import threading
import time
from functools import partial

import torch

import matu_lib.server as srv
from matu_lib import kernels
from matu_lib.aggregation import server_round
from matu_lib.communication import unify_payload
from matu_lib.modulators import DEFAULT_CHUNK_SIZE, _block_span, mask_nbytes, unify
from matu_lib.server import MaTUServer


def mem_available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def make_vectors(n: int, params: int, seed: int, device: str = "cpu") -> list[torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(seed)
    vectors = []
    for _ in range(n):
        v = torch.randn(params, generator=g, device=device).mul_(1e-3)
        v[torch.rand(params, generator=g, device=device) < 0.2] = 0.0
        vectors.append(v)
    return vectors


class Clock:
    """Wall time and peak memory of a block: on CUDA the allocator's peak (after synchronising, as GPU work is
    asynchronous), on CPU the largest RSS seen by a thread sampling every millisecond (the process-wide peak RSS
    would carry over from earlier, larger phases)."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, current_rss_bytes())
            time.sleep(0.001)

    def __enter__(self) -> Clock:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.peak = current_rss_bytes()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.t0
        if self.cuda:
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, current_rss_bytes())


def copy_floor(tensors: list[torch.Tensor], device: str) -> float:
    """Seconds to ``copy_`` every tensor into a preallocated buffer of its size and dtype: the memory floor of one
    pass that reads these bytes and writes as many. Timed right before each run of an operator, so that each ratio
    compares two timings taken under the same conditions (the floor alone varied by 20-30% between runs here)."""
    buffers: dict[tuple, torch.Tensor] = {}
    for t in tensors:  # allocated and first-touched outside the timing
        buffers.setdefault((t.numel(), t.dtype), torch.zeros_like(t))
    with Clock(device) as clock:
        for t in tensors:
            buffers[(t.numel(), t.dtype)].copy_(t)
    return clock.seconds


def runs_text(seconds: list[float]) -> str:
    """The times of repeated runs (the best is reported), or nothing for a single run."""
    return f"best of {len(seconds)}: {', '.join(f'{s:.3f}' for s in seconds)}; " if len(seconds) > 1 else ""


def paired_text(seconds: list[float], floors: list[float]) -> str:
    """Each run against the copy floor timed just before it; the median of those ratios is the figure to quote."""
    ratios = sorted(s / f for s, f in zip(seconds, floors))
    return (
        f"{statistics.median(ratios):.2f}x the copy_ floor timed before each run (median of "
        f"{', '.join(f'{r:.2f}' for r in ratios)})"
    )


def held_bytes(device: str) -> int:
    return torch.cuda.memory_allocated() if device.startswith("cuda") else current_rss_bytes()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=30, help="number of task vectors")
    parser.add_argument("--params", type=int, default=88_000_000, help="parameters per vector (ViT-B/32: ~88M)")
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, help="slice length of the torch form")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch and numba threads (default: all cores)")
    parser.add_argument("--unpacked", action="store_true", help="return bool masks instead of bit-packed ones")
    parser.add_argument("--no-server", action="store_true", help="time unify only")
    parser.add_argument("--repeats", type=int, default=3, help="rounds timed per compiled backend (best reported)")
    parser.add_argument(
        "--backend",
        choices=("auto", "torch", "numba", "both"),
        default="auto",
        help="compiled kernels (numba, CPU), torch ops, or both one after the other",
    )
    parser.add_argument("--device", default="cpu", help="where the vectors live and the arithmetic runs")
    parser.add_argument(
        "--magnitude",
        choices=("max", "mean"),
        default="mean",
        help="elected magnitude (the workbook's MaTU default is mean; EMR's is max)",
    )
    args = parser.parse_args()

    if args.threads is not None:
        torch.set_num_threads(args.threads)  # on a shared machine, fewer threads than cores avoids stalls
        if kernels.AVAILABLE:
            kernels.numba.set_num_threads(min(args.threads, kernels.numba.config.NUMBA_NUM_THREADS))
    cuda = args.device.startswith("cuda")
    backends = ["torch", "numba"] if args.backend == "both" else [args.backend]
    if cuda:
        backends = ["torch"]  # the kernels are CPU code; on a GPU the torch form runs slice by slice
    input_bytes = args.n * args.params * 4
    available = torch.cuda.mem_get_info()[0] if cuda else mem_available_bytes()
    if available is not None and input_bytes > 0.6 * available:
        raise SystemExit(
            f"inputs need {input_bytes / 1e9:.1f} GB but only {available / 1e9:.1f} GB is available "
            "(the server round holds uploads and downloads of 1.5x that); use a smaller --params or --n"
        )
    print(
        f"N={args.n} vectors x P={args.params:,} params (float32) = {input_bytes / 1e9:.2f} GB of inputs on "
        f"{args.device}; torch threads={torch.get_num_threads()}, kernel threads={kernels.threads()}; "
        f"magnitude={args.magnitude}; backends={backends}"
    )
    if cuda:
        print(f"device: {torch.cuda.get_device_name()}")
    vectors = make_vectors(args.n, args.params, args.seed, args.device)
    workers = 1 if cuda else kernels.threads()
    for backend in backends:  # compile once on a small input, so timings are of the run, not of the compiler
        small = [v[:4096].clone() for v in vectors[:3]]
        unify(small, magnitude=args.magnitude, backend=backend)
        warm = unify_payload(0, ("a", "b"), small[:2], {"a": 1, "b": 1}, "sum", "negative", True, True, args.magnitude)
        srv.server_round = partial(server_round, backend=backend)
        MaTUServer(magnitude=args.magnitude, device=args.device if cuda else None).aggregate([warm])

    # Copy floor, two ways: clone (allocation + page faults + copy, as any fresh output pays) and
    # copy_ into one preallocated buffer (pure read + write bandwidth).
    with Clock(args.device) as clone:
        for v in vectors:
            copy = v.clone()  # freed on the next iteration
    del copy
    floors = [copy_floor(vectors, args.device) for _ in range(3)]  # one copy varied by 20-30% on the CI machine kind
    floor = min(floors)
    print(f"clone:         {clone.seconds:8.3f} s  ({input_bytes / clone.seconds / 1e9:.2f} GB/s)")
    print(f"copy_ floor:   {floor:8.3f} s  ({input_bytes / floor / 1e9:.2f} GB/s; {runs_text(floors)[:-2]})")

    for backend in backends:
        repeats = 1 if backend == "torch" else args.repeats
        clocks, floors, extras = [], [], []
        for _ in range(repeats):
            floors.append(copy_floor(vectors, args.device))
            held = held_bytes(args.device)
            with Clock(args.device) as clock:
                unified, masks, rescalers = unify(
                    vectors,
                    chunk_size=args.chunk_size,
                    pack=not args.unpacked,
                    magnitude=args.magnitude,
                    backend=backend,
                )
            output_bytes = unified.numel() * 4 + sum(m.numel() * m.element_size() for m in masks)
            clocks.append(clock)
            extras.append(clock.peak - held - output_bytes)
            if len(clocks) < repeats:
                del unified, masks
        clock = min(clocks, key=lambda c: c.seconds)
        extra = max(extras)
        slice_bytes = (
            (
                _block_span(args.n, args.chunk_size, torch.device(args.device), True)
                if backend == "torch"
                else kernels.block_columns(args.n)
            )
            * args.n
            * 4
        )
        print(
            f"unify [{backend}]: {clock.seconds:8.3f} s  ({runs_text([c.seconds for c in clocks])}"
            f"{input_bytes / clock.seconds / 1e9:.2f} GB/s of inputs; {clock.seconds / floor:.2f}x the best copy_ "
            f"floor above, "
            f"{clock.seconds / clone.seconds:.2f}x clone)"
        )
        print(f"    {paired_text([c.seconds for c in clocks], floors)}")
        print(
            f"    memory beyond inputs + outputs ({output_bytes / 1e9:.3f} GB: tau_u + "
            f"{'bool' if args.unpacked else 'packed'} masks): {max(extra, 0) / 1e6:.1f} MB "
            f"(one slice per worker: {workers} x {slice_bytes / 1e6:.1f} MB; a dense stack: {input_bytes / 1e6:.0f} MB)"
        )
        print(
            f"    per-task modulators: {mask_nbytes(args.params) + 4:,} bytes; rescalers "
            f"{min(rescalers):.3f}..{max(rescalers):.3f}"
        )
        del unified, masks
    if args.no_server:
        return
    # server round: N/2 clients x 2 tasks, task t held by clients t and t+1 (mod), uploads built untimed
    n_clients = max(2, args.n // 2)
    uploads = []
    for k in range(n_clients):
        tasks = (f"task{k}", f"task{(k + 1) % n_clients}")
        pair = [vectors.pop() if vectors else vectors_fallback(args, k, i) for i in range(2)]
        uploads.append(
            unify_payload(k, tasks, pair, {t: 100 + k for t in tasks}, "sum", "negative", True, True, args.magnitude)
        )
        del pair
    vectors.clear()
    read = sum(u.vectors["unified"].numel() * 4 + sum(m.numel() for m in u.masks.values()) for u in uploads)
    # each backend writes fresh downloads; the last run also writes them over the uploads (``consume``: a server
    # that owns its decoded uploads), which destroys them, so it comes last
    runs = [(b, False) for b in backends] + [(backends[-1], True)]
    for backend, consume in runs:
        server = MaTUServer(magnitude=args.magnitude, device=args.device if cuda else None)
        srv.server_round = partial(server_round, backend=backend)  # the backend under test, for this round
        clocks, extras, floors = [], [], []
        for _ in range(
            1 if backend == "torch" else args.repeats
        ):  # a consumed round's downloads are the next's uploads
            floors.append(
                copy_floor([t for u in uploads for t in (u.vectors["unified"], *u.masks.values())], args.device)
            )
            held = held_bytes(args.device)
            with Clock(args.device) as clock:
                downloads, _ = server.aggregate(uploads, consume=consume)
            written = sum(
                d.vectors["unified"].numel() * 4 + sum(m.numel() for m in d.masks.values()) for d in downloads.values()
            )
            clocks.append(clock.seconds)
            extras.append(clock.peak - held - (0 if consume else written))
            del downloads
        best = min(clocks)
        block = kernels.block_columns(2 * n_clients) if backend != "torch" and not cuda else args.chunk_size
        where = "written over the uploads" if consume else "written to new buffers"
        print(
            f"server round [{backend}, downloads {where}]: {best:8.3f} s  ({runs_text(clocks)}{n_clients} clients "
            f"x 2 tasks: "
            f"reads {read / 1e9:.2f} GB of uploads, writes {written / 1e9:.2f} GB of downloads; "
            f"{best / (floor * read / input_bytes):.2f}x the best copy_ floor above for the bytes read)"
        )
        print(f"    {paired_text(clocks, floors)}")
        print(
            f"    memory beyond uploads + downloads (largest of the runs): {max(max(extras), 0) / 1e6:.1f} MB (one "
            f"slice per worker: {workers} x {block * n_clients * 2 * 4 / 1e6:.1f} MB; the per-task averages as a "
            f"stack: {n_clients * args.params * 4 / 1e6:.0f} MB)"
        )


def vectors_fallback(args, k: int, i: int) -> torch.Tensor:
    """More vectors than N when N is odd: generate one more the same way."""
    return make_vectors(1, args.params, args.seed + 1000 + 2 * k + i)[0]


if __name__ == "__main__":
    main()
