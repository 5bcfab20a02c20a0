"""Assign tasks and training samples to federated clients (the many-task FL setting).

Each client holds several tasks (MaTU's point: clients are not single-task); a task held by several clients has
its TRAIN split divided between them without overlap, either IID or label-skewed with per-class Dirichlet
proportions. Validation and test splits stay global and never appear in a manifest. The result is a plain,
JSON-able `Manifest`, so a run can be reproduced or inspected without re-running the partitioner.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class ClientShard:
    """The train-split indices of one task held by one client."""

    client_id: int
    task: str
    indices: tuple[int, ...]


@dataclass(frozen=True)
class Manifest:
    seed: int
    tasks: tuple[str, ...]
    n_clients: int
    shards: tuple[ClientShard, ...]

    def tasks_of(self, client_id: int) -> list[str]:
        return [s.task for s in self.shards if s.client_id == client_id]

    def clients_of(self, task: str) -> list[int]:
        return [s.client_id for s in self.shards if s.task == task]

    def indices(self, client_id: int, task: str) -> tuple[int, ...]:
        for s in self.shards:
            if s.client_id == client_id and s.task == task:
                return s.indices
        raise KeyError(f"client {client_id} does not hold task {task!r}; it holds {self.tasks_of(client_id)}")

    def to_dict(self) -> dict:
        return {
            "seed": self.seed,
            "tasks": list(self.tasks),
            "n_clients": self.n_clients,
            "shards": [{"client_id": s.client_id, "task": s.task, "indices": list(s.indices)} for s in self.shards],
        }

    @classmethod
    def from_dict(cls, d: dict) -> Manifest:
        return cls(
            int(d["seed"]),
            tuple(d["tasks"]),
            int(d["n_clients"]),
            tuple(ClientShard(int(s["client_id"]), s["task"], tuple(s["indices"])) for s in d["shards"]),
        )

    def summary(self) -> str:
        """One line per client: its tasks with their sample counts."""
        lines = [f"{'client':>6}  tasks (train samples)"]
        for c in range(self.n_clients):
            held = ", ".join(f"{s.task} ({len(s.indices)})" for s in self.shards if s.client_id == c)
            lines.append(f"{c:>6}  {held}")
        return "\n".join(lines)


def _assign_tasks(
    tasks: list[str],
    n_clients: int,
    lo: int,
    hi: int,
    min_clients: int,
    rng: np.random.Generator,
    families: list[str] | None = None,
) -> list[list[str]]:
    """Give each client between lo and hi distinct tasks so that every task has >= min_clients holders.

    Greedy least-held-first over interleaved slots keeps holder counts within one of each other, which both
    guarantees coverage (when enough slots exist) and makes most tasks shared by several clients.
    With ``families`` (one family name per task) a client prefers tasks from families it does not hold yet,
    so related tasks sit on different clients: then only the server can connect them.
    """
    n_tasks = len(tasks)
    k = rng.integers(lo, hi + 1, size=n_clients)
    while k.sum() < n_tasks * min_clients:  # not enough slots for coverage: grow random non-full clients
        k[rng.choice(np.flatnonzero(k < hi))] += 1
    held: list[list[int]] = [[] for _ in range(n_clients)]
    count = np.zeros(n_tasks, dtype=np.int64)
    for r in range(hi):
        for c in rng.permutation(n_clients):
            if k[c] <= r:
                continue
            free = np.array([t for t in range(n_tasks) if t not in held[c]])
            score = count[free].astype(float)
            if families is not None:  # a task of a family the client holds counts as 2 holders more
                own = {families[u] for u in held[c]}
                score += np.array([2.0 * (families[t] in own) for t in free])
            least = free[score == score.min()]
            t = int(rng.choice(least))
            held[c].append(t)
            count[t] += 1
    # repair: move a slot from an over-held task to an under-held one, never duplicating a task on a client
    for t in np.flatnonzero(count < min_clients):
        while count[t] < min_clients:
            donors = [(c, u) for c in range(n_clients) if t not in held[c] for u in held[c] if count[u] > min_clients]
            if not donors:
                raise ValueError("cannot cover every task with the given clients and tasks_per_client")
            c, u = donors[int(rng.integers(len(donors)))]
            held[c][held[c].index(u)] = int(t)
            count[u] -= 1
            count[t] += 1
    return [[tasks[t] for t in sorted(h)] for h in held]


def _split_iid(n: int, m: int, rng: np.random.Generator) -> list[np.ndarray]:
    return [np.sort(p) for p in np.array_split(rng.permutation(n), m)]


def _split_dirichlet(labels: np.ndarray, m: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    """Per class, split its samples among m clients with proportions ~ Dir(alpha); then make sure every client
    keeps at least one sample by taking one from the largest shard."""
    parts: list[list[int]] = [[] for _ in range(m)]
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        cuts = (np.cumsum(rng.dirichlet(np.full(m, alpha)))[:-1] * len(idx)).astype(int)
        for j, chunk in enumerate(np.split(idx, cuts)):
            parts[j].extend(chunk.tolist())
    for j in range(m):
        if not parts[j]:
            big = max(range(m), key=lambda i: len(parts[i]))
            parts[j].append(parts[big].pop(int(rng.integers(len(parts[big])))))
    return [np.sort(np.array(p, dtype=np.int64)) for p in parts]


def partition(
    task_sizes: dict[str, int],
    n_clients: int,
    tasks_per_client: tuple[int, int] = (2, 4),
    clients_per_task_min: int = 1,
    split: str = "iid",
    alpha: float = 0.5,
    labels: dict[str, torch.Tensor] | None = None,
    seed: int = 0,
    families: dict[str, str] | None = None,
) -> Manifest:
    """Partition tasks and their train samples over `n_clients` clients. Same arguments -> same manifest.

    task_sizes: task -> size of its TRAIN split. tasks_per_client: inclusive (min, max) tasks per client.
    split: "iid" (random equal split) or "dirichlet" (label skew; needs `labels[task]` = train labels).
    families: task -> family; when given, a client avoids holding two tasks of one family where it can.
    """
    tasks = list(task_sizes)
    lo, hi = tasks_per_client
    if not tasks:
        raise ValueError("task_sizes is empty: nothing to partition")
    if n_clients < 1:
        raise ValueError(f"n_clients must be >= 1, got {n_clients}")
    if not 1 <= lo <= hi:
        raise ValueError(f"tasks_per_client must satisfy 1 <= min <= max, got {tasks_per_client}")
    if hi > len(tasks):
        raise ValueError(f"tasks_per_client max {hi} exceeds the number of tasks ({len(tasks)})")
    if not 1 <= clients_per_task_min <= n_clients:
        raise ValueError(f"clients_per_task_min must be in [1, n_clients={n_clients}], got {clients_per_task_min}")
    if n_clients * hi < len(tasks) * clients_per_task_min:
        raise ValueError(
            f"tasks_per_client max {hi} x {n_clients} clients gives fewer slots than "
            f"{len(tasks)} tasks x clients_per_task_min {clients_per_task_min}: some task would be unheld"
        )
    if split not in ("iid", "dirichlet"):
        raise ValueError(f"unknown split {split!r}; valid: 'iid', 'dirichlet'")
    if split == "dirichlet":
        if alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        missing = [t for t in tasks if labels is None or t not in labels]
        if missing:
            raise ValueError(f"split='dirichlet' needs train labels for every task; missing: {missing}")
        for t in tasks:
            if len(labels[t]) != task_sizes[t]:
                raise ValueError(f"labels[{t!r}] has {len(labels[t])} entries but task_sizes says {task_sizes[t]}")

    rng = np.random.default_rng([seed, 0x6D617475])  # "matu": keeps this stream apart from task builders
    fam = None if families is None else [families.get(t, t) for t in tasks]
    held = _assign_tasks(tasks, n_clients, lo, hi, clients_per_task_min, rng, fam)
    shards: list[ClientShard] = []
    for t in tasks:
        holders = [c for c in range(n_clients) if t in held[c]]
        if task_sizes[t] < len(holders):
            raise ValueError(f"task {t!r} has {task_sizes[t]} train samples, fewer than its {len(holders)} clients")
        if split == "iid":
            parts = _split_iid(task_sizes[t], len(holders), rng)
        else:
            parts = _split_dirichlet(np.asarray(labels[t]), len(holders), alpha, rng)
        shards += [ClientShard(c, t, tuple(int(i) for i in p)) for c, p in zip(holders, parts)]
    shards.sort(key=lambda s: (s.client_id, tasks.index(s.task)))
    return Manifest(seed, tuple(tasks), n_clients, tuple(shards))
