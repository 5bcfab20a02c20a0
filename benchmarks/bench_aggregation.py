"""Benchmark: one ``unify`` (EMR elect/mask/rescale) over N task vectors of P parameters, and one server round
(reconstruct every upload, average per task, re-unify per client) over the same number of vectors.

Prints the wall time of each, the peak RSS, and the time of copying the same bytes once -- ``torch.clone`` of
each vector (allocation + copy) and ``copy_`` into one preallocated buffer (the pure memory-bandwidth floor any
streaming operator pays) -- with the ratio of each operator to the floor.

    make bench                                                # CI size: N=30, P=2M, one run of both
    python benchmarks/bench_aggregation.py                   # N=30, P=88M (ViT-B/32): 10.6 GB of inputs
    python benchmarks/bench_aggregation.py --params 22000000 # N=30, P=22M: 2.6 GB of inputs
    (add --threads 1 on a shared machine: oversubscribed intra-op threads make timings erratic)

The server round is measured on N/2 clients holding 2 tasks each (N (client, task) vectors in all), every task
held by two clients, uploads built by ``unify`` beforehand (not timed); the clients' own vectors are freed before
the round, so the held inputs are the uploads (tau_u + bool masks, as ``Payload`` carries them).

Inputs are *held in memory*, as a client holds its task vectors: 30 x 88M float32 is 10.6 GB, which
fits a 24 GB machine; the script refuses to start when the inputs would exceed 60% of MemAvailable
rather than swap. Vectors are generated one at a time from a seeded generator (about 20% exact
zeros, like sparse fine-tuning updates), so no (tasks x params) stack is ever built. Masks are
returned bit-packed (the upload format, ``pack=True``); ``--unpacked`` returns bool masks instead.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from matu_lib.modulators import DEFAULT_CHUNK_SIZE, mask_nbytes, unify
from matu_lib.client import unify_payload
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


def make_vectors(n: int, params: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    vectors = []
    for _ in range(n):
        v = torch.randn(params, generator=g).mul_(1e-3)
        v[torch.rand(params, generator=g) < 0.2] = 0.0
        vectors.append(v)
    return vectors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=30, help="number of task vectors")
    parser.add_argument("--params", type=int, default=88_000_000, help="parameters per vector (ViT-B/32: ~88M)")
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--unpacked", action="store_true", help="return bool masks instead of bit-packed ones")
    parser.add_argument("--no-server", action="store_true", help="time unify only")
    parser.add_argument("--magnitude", choices=("max", "mean"), default="mean",
                        help="elected magnitude (the workbook's MaTU default is mean; EMR's is max)")
    args = parser.parse_args()

    if args.threads is not None:
        torch.set_num_threads(args.threads)  # on a shared machine, fewer threads than cores avoids stalls
    input_bytes = args.n * args.params * 4
    available = mem_available_bytes()
    if available is not None and input_bytes > 0.6 * available:
        raise SystemExit(
            f"inputs need {input_bytes / 1e9:.1f} GB but only {available / 1e9:.1f} GB is available; "
            "use a smaller --params or --n"
        )

    print(f"N={args.n} vectors x P={args.params:,} params (float32) = {input_bytes / 1e9:.2f} GB of inputs; "
          f"chunk_size={args.chunk_size:,}; magnitude={args.magnitude}; torch threads={torch.get_num_threads()}")
    vectors = make_vectors(args.n, args.params, args.seed)
    rss_inputs = current_rss_bytes()

    # Copy floor, two ways: clone (allocation + page faults + copy, as any fresh output pays) and
    # copy_ into one preallocated buffer (pure read + write bandwidth).
    t0 = time.perf_counter()
    for v in vectors:
        copy = v.clone()  # freed on the next iteration
    t_clone = time.perf_counter() - t0
    t0 = time.perf_counter()
    for v in vectors:
        copy.copy_(v)
    t_copy = time.perf_counter() - t0
    del copy

    t0 = time.perf_counter()
    unified, masks, rescalers = unify(vectors, chunk_size=args.chunk_size, pack=not args.unpacked,
                                      magnitude=args.magnitude)
    t_unify = time.perf_counter() - t0
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB

    output_bytes = unified.numel() * unified.element_size() + sum(m.numel() * m.element_size() for m in masks)
    print(f"unify:         {t_unify:8.2f} s  ({input_bytes / t_unify / 1e9:.2f} GB/s of inputs)")
    print(f"clone:         {t_clone:8.2f} s  ({input_bytes / t_clone / 1e9:.2f} GB/s; ratio {t_unify / t_clone:.1f}x)")
    print(f"copy_ floor:   {t_copy:8.2f} s  ({input_bytes / t_copy / 1e9:.2f} GB/s; ratio {t_unify / t_copy:.1f}x)")
    print(f"RSS with inputs held: {rss_inputs / 1e9:.2f} GB; peak RSS: {peak_rss / 1e9:.2f} GB "
          f"(outputs {output_bytes / 1e9:.2f} GB: tau_u + {'bool' if args.unpacked else 'packed'} masks; "
          f"a dense stack would add {input_bytes / 1e9:.2f} GB)")
    print(f"per-task modulators: {mask_nbytes(args.params) + 4:,} bytes (packed mask + float32 rescaler); "
          f"rescalers range {min(rescalers):.3f}..{max(rescalers):.3f}")
    if args.no_server:
        return
    del unified, masks
    # server round: N/2 clients x 2 tasks, task t held by clients t and t+1 (mod), uploads built untimed
    n_clients = max(2, args.n // 2)
    uploads = []
    for k in range(n_clients):
        tasks = (f"task{k}", f"task{(k + 1) % n_clients}")
        uploads.append(unify_payload(k, tasks, [vectors.pop() if vectors else vectors_fallback(args, k, i)
                                                for i in range(2)], {t: 100 + k for t in tasks},
                                     "sum", "negative", True, True, args.magnitude))
    vectors.clear()
    held = sum(u.vectors["unified"].numel() * 4 + sum(m.numel() for m in u.masks.values()) for u in uploads)
    rss_uploads = current_rss_bytes()
    server = MaTUServer(magnitude=args.magnitude)
    t0 = time.perf_counter()
    downloads, _ = server.aggregate(uploads)
    t_server = time.perf_counter() - t0
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    read = held  # every upload's tau_u and masks are read once
    print(f"server round:  {t_server:8.2f} s  ({n_clients} clients x 2 tasks; reads {read / 1e9:.2f} GB of uploads; "
          f"{t_server / (t_copy * read / input_bytes):.1f}x the copy_ floor for those bytes)")
    print(f"RSS with uploads held: {rss_uploads / 1e9:.2f} GB; peak RSS so far: {peak_rss / 1e9:.2f} GB "
          f"(the round must also hold {n_clients} per-task averages and {len(downloads)} downloads)")


def vectors_fallback(args, k: int, i: int) -> torch.Tensor:
    """More vectors than N when N is odd: generate one more the same way."""
    return make_vectors(1, args.params, args.seed + 1000 + 2 * k + i)[0]


if __name__ == "__main__":
    main()
