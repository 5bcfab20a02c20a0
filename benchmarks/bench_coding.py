"""The server's half of one round per coding setting: does compression make the server the bottleneck?

    python benchmarks/bench_coding.py                          # the cpu preset's shape: 12 clients x 4 tasks, 216 K
    python benchmarks/bench_coding.py --params 22000000        # a quarter of ViT-B/32 per vector

Synthetic uploads (each client's four task vectors unified and coded as a client would) go through
``methods.serve_round`` for MaTU and per-task FedAvg: decoding, screening, aggregation, coding the downloads.
The client's side (unify + encode) is timed too. Seconds are wall time on this machine, best of ``--repeat``;
ratios to float32 are within one run. Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("MATU_PROGRESS", "0")

import torch  # noqa: E402

from matu_lib.communication import Payload, code_vectors, unify_payload  # noqa: E402
from matu_lib.communication_study import SETTINGS  # noqa: E402
from matu_lib.methods import MaTUServerHalf, PerTaskServerHalf, serve_round  # noqa: E402
from matu_lib.presets import preset  # noqa: E402


def uploads(cfg, n_params: int, n_clients: int, tasks_per_client: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tasks = [f"t{i}" for i in range(n_clients)]
    holdings = {k: tuple(tasks[(k + j) % n_clients] for j in range(tasks_per_client)) for k in range(n_clients)}
    vectors = {(k, t): torch.randn(n_params, generator=g) * 1e-3 for k, ts in holdings.items() for t in ts}
    return tasks, holdings, vectors


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=int, default=215_680)
    parser.add_argument("--clients", type=int, default=12)
    parser.add_argument("--tasks-per-client", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(
        f"{args.clients} clients x {args.tasks_per_client} tasks, {args.params:,} parameters, "
        f"{torch.get_num_threads()} torch thread(s); seconds are the best of {args.repeat}"
    )
    print(
        f"{'setting':32s} {'client MaTU':>12s} {'server MaTU':>12s} {'x float32':>10s} "
        f"{'server per-task':>16s} {'x float32':>10s}"
    )
    base = {}
    for name, overrides in SETTINGS.items():
        cfg = preset("cpu", **overrides)
        tasks, holdings, vectors = uploads(cfg, args.params, args.clients, args.tasks_per_client)
        opts = dict(rule=cfg.elect_rule, tie=cfg.tie_rule, use_masks=True, use_rescalers=True, magnitude=cfg.magnitude)

        def client_side():
            return [
                unify_payload(
                    k,
                    ts,
                    [vectors[(k, t)] for t in ts],
                    dict.fromkeys(ts, 60),
                    **opts,
                    bits=cfg.upload_bits,
                    fraction=cfg.upload_topk,
                    block=cfg.code_block,
                )
                for k, ts in holdings.items()
            ]

        matu_up = client_side()
        t_client = best(client_side, args.repeat) / args.clients
        server = MaTUServerHalf(cfg, args.params, tasks, holdings)
        t_matu = best(lambda: serve_round(server, matu_up, list(holdings), list(holdings)), args.repeat)
        per_task = PerTaskServerHalf(cfg, args.params, tasks, holdings)
        pt_up = [
            Payload(
                k,
                ts,
                {f"task:{t}": vectors[(k, t)] for t in ts},
                counts=dict.fromkeys(ts, 60),
                coded=code_vectors(
                    {f"task:{t}": vectors[(k, t)] for t in ts}, cfg.upload_bits, cfg.upload_topk, cfg.code_block
                ),
            )
            for k, ts in holdings.items()
        ]
        t_pt = best(lambda: serve_round(per_task, pt_up, list(holdings), list(holdings)), args.repeat)
        base = base or {"matu": t_matu, "pt": t_pt}
        print(
            f"{name:32s} {t_client:11.3f}s {t_matu:11.3f}s {t_matu / base['matu']:9.2f}x "
            f"{t_pt:15.3f}s {t_pt / base['pt']:9.2f}x"
        )


if __name__ == "__main__":
    main()
