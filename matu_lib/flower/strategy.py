"""One Flower strategy for every iterative method, running the project's own halves so Flower equals in-process.

``MethodStrategy(cfg, method)`` builds the method's server half (``methods.ServerHalf``: MaTU, FedAvg, FedProx,
per-task FedAvg, MaT-FL grouping) and calls ``methods.serve_round`` on the decoded replies: the same counting,
screening and aggregation as ``methods.IterativeMethod.run_round`` (and the project's arithmetic, not Flower's
FedAvg, whose summation order and precision would change the last bits). Uploads are aggregated in client-id
order, as in-process.

Nothing about a client survives a round on the MaTU server: each download leaves in the same round:
``configure_evaluate`` sends every client that got one its download (Flower cannot push, so it rides the
round's evaluate message; a round without evaluation still sends it, flagged ``evaluate = false``), the
ClientApp keeps it in the node's ``Context.state`` (client state, like its error feedback), and the strategy
drops it (``pending`` is empty again before the round ends). Methods whose server keeps the model (the FedAvg
family) send it in each train and evaluate message instead. What the strategy keeps between rounds besides
the server half: the node map (project client id -> Flower node id, learnt once by a ``query`` handshake in
which every ClientApp reports its ``partition-id``) and the run history (``federation.round_entry``).
``server_state_bytes`` is measured on the strategy object itself (``server.held_nbytes``): 0 for MaTU.

Wire format: every payload is ``Payload.to_bytes()`` carried as one ``Array`` (dtype uint8, stype
``matu.payload``) in an ``ArrayRecord``. This is lossless (the bytes are the project's wire format, whose
length is exactly what the byte accounting counts) and, unlike a ``bytes`` value in a ``ConfigRecord``,
Flower ships ``Array`` objects through its object store in chunks, so ViT-sized payloads do not hit gRPC's
message size limit in a deployment.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from logging import INFO
from pathlib import Path

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore.logger import log

from ..communication import MAX_VECTOR_LENGTH, Payload, PayloadError
from ..federation import final_summary, round_entry, sample_clients, summarise
from ..methods import METHODS, IterativeMethod, RoundResult, serve_round
from ..presets import RunConfig
from ..server import held_nbytes

# every iterative method runs on Flower, through its own client and server halves
FLOWER_METHODS = frozenset(m for m, cls in METHODS.items() if issubclass(cls, IterativeMethod))

PAYLOAD_STYPE = "matu.payload"


# ------------------------------------------------------------------------------------------- transport


def payload_record(payload: Payload | bytes) -> ArrayRecord:
    """A ``Payload`` (or its ``to_bytes()``) as an ArrayRecord holding the raw wire bytes, unchanged."""
    blob = payload if isinstance(payload, bytes) else payload.to_bytes()
    return ArrayRecord({"payload": Array(dtype="uint8", shape=(len(blob),), stype=PAYLOAD_STYPE, data=blob)})


def record_payload(record: object, max_length: int = MAX_VECTOR_LENGTH) -> tuple[Payload, int]:
    """Inverse of ``payload_record``: the Payload and the number of wire bytes it arrived as.

    The record comes from another machine: anything but an ArrayRecord holding one ``matu.payload`` array of
    well-formed bytes raises one ``PayloadError`` saying what is wrong. ``max_length`` (the receiver's encoder
    size) bounds what a coded vector may declare, so a few hostile bytes cannot make the decoder allocate more.
    """
    if not isinstance(record, ArrayRecord):
        raise PayloadError(f"expected an ArrayRecord, got a {type(record).__name__}")
    if "payload" not in record:
        raise PayloadError(f"the ArrayRecord has no 'payload' array (keys {sorted(record)[:5]})")
    arr = record["payload"]
    if not isinstance(arr, Array) or arr.stype != PAYLOAD_STYPE:
        raise PayloadError(
            f"expected an array of stype {PAYLOAD_STYPE!r}, got {getattr(arr, 'stype', type(arr).__name__)!r}"
        )
    data = arr.data
    if not isinstance(data, bytes):
        raise PayloadError(f"the payload array holds {type(data).__name__}, not bytes")
    return Payload.from_bytes(data, max_length), len(data)


def cfg_json(cfg: RunConfig) -> str:
    """The config as sent to ClientApps: the same JSON as ``config.json`` (tuples -> lists)."""
    return json.dumps(cfg.to_dict(), sort_keys=True)


def known_params(cfg: RunConfig) -> tuple[int, list[str]]:
    """(encoder parameter count, task ids) for ``screen_uploads``, computed by the server from ``cfg`` alone.

    The server must not trust clients for what it validates them against, and it needs no client data:
    only the backbone's shapes and the task list.
    """
    from ..backbones import load_backbone
    from ..task_vectors import TaskVector

    backbone = load_backbone(cfg.model, cfg.pretrained, "cpu")
    n_params = TaskVector(backbone.encoder_state()).flatten().numel()
    if cfg.tasks is not None:
        tasks = list(cfg.tasks)
    elif cfg.dataset == "real":
        from ..data import REAL_TASKS

        tasks = list(REAL_TASKS)
    else:
        from ..data import list_tasks

        tasks = list(list_tasks())
    return n_params, tasks  # in the runner's task order


def known_holdings(cfg: RunConfig) -> dict[int, tuple[str, ...]] | None:
    """Which tasks each client holds, derived like ``federation.build_context`` from ``cfg`` alone, so the server
    can refuse an upload for a task its sender does not hold. Only for the offline suite with an iid split
    (train sizes come from the task registry); otherwise None and uploads are checked against the task list."""
    if cfg.dataset != "offline" or cfg.split != "iid":
        return None
    from ..data import get_task, list_tasks
    from ..presets import partition_for

    names = list(cfg.tasks) if cfg.tasks is not None else list_tasks()
    cap = cfg.max_train_per_task
    sizes = {t: get_task(t).n_train if cap is None else min(cap, get_task(t).n_train) for t in names}
    manifest = partition_for(cfg, sizes)
    return {k: tuple(manifest.tasks_of(k)) for k in range(cfg.n_clients)}  # each client's tasks in its order


# -------------------------------------------------------------------------------------------- strategy


class MethodStrategy(Strategy):
    """Every iterative method on Flower: the method's server half (``methods.ServerHalf``) driven by
    ``methods.serve_round``, exactly as ``methods.IterativeMethod.run_round`` drives it in-process.

    ``on_entry(entry)`` is called with every finished history entry (the simulation driver writes
    ``metrics.jsonl`` from it); ``reference`` adds normalised accuracies as in ``federation.run``.
    """

    def __init__(
        self,
        cfg: RunConfig,
        method: str = "matu",
        reference: dict[str, float] | None = None,
        on_entry: Callable[[dict], None] | None = None,
        handshake_timeout: float = 600.0,
        n_params: int | None = None,
        tasks: Iterable[str] | None = None,
        holdings: dict[int, Iterable[str]] | None = None,
    ) -> None:
        if method not in FLOWER_METHODS:
            raise KeyError(f"Flower runs the iterative methods {sorted(FLOWER_METHODS)}, not '{method}'")
        self.cfg, self.method = cfg, method
        self.reference = reference
        self.on_entry = on_entry
        self.handshake_timeout = handshake_timeout
        if n_params is None or tasks is None:
            n_params, tasks = known_params(cfg)
        holdings = holdings if holdings is not None else known_holdings(cfg)  # None: not derivable from cfg
        holdings = None if holdings is None else {k: tuple(ts) for k, ts in holdings.items()}
        self.server = METHODS[method].server_half(cfg, n_params, list(tasks), holdings)
        self.server.owns_uploads = True  # uploads are decoded from the replies here and kept by nobody else
        self.node_of: dict[int, int] = {}  # project client id -> Flower node id
        self.pending: dict[int, bytes] = {}  # this round's downloads until configure_evaluate sends them
        self.history: list[dict] = []
        self.cum_up = self.cum_down = 0
        self.wire = {"train_down": 0, "train_up": 0, "eval_down": 0}  # bytes actually carried by Flower
        self._entry: dict = {}
        self._t0 = 0.0

    # ---------------------------------------------------------------------------------- helpers

    def summary(self) -> None:
        log(
            INFO,
            "\t├── %s: %d clients, %d rounds, participation %.2f, seed %d",
            type(self).__name__,
            self.cfg.n_clients,
            self.cfg.rounds,
            self.cfg.participation,
            self.cfg.seed,
        )

    def server_state_nbytes(self) -> int:
        """Bytes this strategy holds, measured by walking it (called between rounds: ``pending`` is empty)."""
        return held_nbytes(self)

    def _config(self, server_round: int, client_id: int) -> ConfigRecord:
        return ConfigRecord(
            {"method": self.method, "round": server_round, "client-id": client_id, "cfg": cfg_json(self.cfg)}
        )

    def map_nodes(self, grid: Grid) -> None:
        """Learn client id -> node id from each node's ``partition-id`` (a ``query`` to every node).

        Waits until ``cfg.n_clients`` nodes are connected; refuses duplicate or out-of-range partitions, so a
        misconfigured SuperNode fails the run instead of silently training someone else's shard.
        """
        deadline = time.monotonic() + self.handshake_timeout
        while len(nodes := list(grid.get_node_ids())) < self.cfg.n_clients:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(nodes)} of {self.cfg.n_clients} nodes connected")
            time.sleep(1.0)
        msgs = [
            Message(RecordDict({"config": ConfigRecord({"cfg": cfg_json(self.cfg)})}), node, "query") for node in nodes
        ]
        replies = list(grid.send_and_receive(msgs, timeout=self.handshake_timeout))
        node_of: dict[int, int] = {}
        for reply in replies:
            if reply.has_error():
                raise RuntimeError(f"node {reply.metadata.src_node_id} failed the handshake: {reply.error.reason}")
            pid = int(reply.content["partition"]["partition-id"])
            if pid in node_of or not 0 <= pid < self.cfg.n_clients:
                raise ValueError(f"bad or duplicate partition-id {pid} from node {reply.metadata.src_node_id}")
            node_of[pid] = reply.metadata.src_node_id
        missing = sorted(set(range(self.cfg.n_clients)) - set(node_of))
        if missing:
            raise RuntimeError(f"no node answered for partitions {missing}")
        self.node_of = node_of

    def _uploads(self, server_round: int, replies: Iterable[Message]) -> tuple[list[Payload], list[int]]:
        """Decode replies in client-id order (the in-process order: aggregation sums are order-sensitive).

        Returns the uploads and their senders as the node map says (never as the payload claims). A reply that
        cannot be decoded (an error, no ``upload`` record, a wrong record type, garbage or truncated bytes, an
        unknown or repeated node) is rejected by name and the round goes on with the others.
        """
        client_of = {node: k for k, node in self.node_of.items()}
        uploads: dict[int, Payload] = {}
        for reply in replies:
            node = reply.metadata.src_node_id
            k = client_of.get(node)
            who = f"client {k} (node {node})"
            try:
                if k is None:
                    raise PayloadError("reply from a node that holds no client of this run")
                if reply.has_error():
                    raise PayloadError(f"ClientApp error: {reply.error.reason}")
                if k in uploads:
                    raise PayloadError("more than one reply this round")
                if "upload" not in reply.content:
                    raise PayloadError("reply has no 'upload' record")
                upload, n = record_payload(reply.content["upload"], self.server.n_params)
            except PayloadError as err:
                self._entry["rejected"].append(f"{who}: {err}")
                log(INFO, "rejected upload: %s: %s", who, err)
                continue
            self.wire["train_up"] += n
            uploads[k] = upload
        senders = sorted(uploads)
        return [uploads[k] for k in senders], senders

    # ---------------------------------------------------------------------------------- training

    def _blob(self, download: Payload | None) -> bytes | None:
        return None if download is None else download.to_bytes()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Each sampled client gets its OWN download (unified vector + its masks/rescalers) and the round."""
        if not self.node_of:
            self.map_nodes(grid)
        self._t0 = time.perf_counter()
        sampled = sample_clients(self.cfg, server_round)
        self._entry = {"round": server_round, "sampled": sampled, "bytes_up": {}, "bytes_down": {}, "rejected": []}
        messages = []
        for k in sampled:
            content = RecordDict({"config": self._config(server_round, k)})
            blob = self._blob(self.server.train_download(k))  # None for MaTU: the node keeps its own
            if blob is not None:
                content["download"] = payload_record(blob)
                self.wire["train_down"] += len(blob)
            messages.append(Message(content, self.node_of[k], "train"))
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Decode the replies, then ``methods.serve_round`` (count, screen, aggregate), as in-process."""
        uploads, senders = self._uploads(server_round, replies)
        res, downloads = serve_round(self.server, uploads, senders, self._entry["sampled"])
        self._entry["rejected"] += res.rejected
        self._entry |= {"bytes_up": res.bytes_up, "bytes_down": res.bytes_down, "info": res.info}
        if self.server.clients_keep_downloads:  # MaTU: they leave in this round's evaluate messages
            self.pending = {k: down.to_bytes() for k, down in downloads.items()}
        return None, MetricRecord(
            {"bytes_up": res.bytes_up.get("total", 0), "accepted": len(uploads) - len(res.rejected)}
        )

    # -------------------------------------------------------------------------------- evaluation

    def _evaluates(self, server_round: int) -> bool:
        return server_round % self.cfg.eval_every == 0 or server_round == self.cfg.rounds

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Deliver this round's downloads, and let every client (sampled or not, as in-process) evaluate its tasks
        with the vector it holds now. After this call the strategy holds no download: ``pending`` is emptied."""
        evaluates = self._evaluates(server_round)
        pending, self.pending = self.pending, {}
        messages = []
        for k in range(self.cfg.n_clients) if evaluates else sorted(pending):
            config = self._config(server_round, k)
            config["evaluate"] = evaluates
            content = RecordDict({"config": config})
            blob = pending[k] if k in pending else self._blob(self.server.eval_download(k))  # FedAvg family
            if blob is not None:
                content["download"] = payload_record(blob)
                self.wire["eval_down"] += len(blob)
            messages.append(Message(content, self.node_of[k], "evaluate"))
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Finish the round's history entry (same keys and order as ``federation.run``)."""
        e = self._entry
        self.cum_up += e["bytes_up"].get("total", 0)
        self.cum_down += e["bytes_down"].get("total", 0)
        res = RoundResult(e["bytes_up"], e["bytes_down"], e["rejected"], e.get("info", {}))
        entry = round_entry(e["round"], e["sampled"], res, self.cum_up, self.cum_down, self.server_state_nbytes())
        metrics = None
        if self._evaluates(server_round):
            client_of = {node: k for k, node in self.node_of.items()}
            per_client: dict[int, dict[str, float]] = {}
            for reply in replies:
                node = reply.metadata.src_node_id
                try:
                    if reply.has_error():
                        raise ValueError(f"ClientApp error: {reply.error.reason}")
                    k = client_of[node]
                    order = list(reply.content["tasks"]["order"])
                    accs = {t: float(reply.content["acc"][t]) for t in order}
                    if not all(0.0 <= a <= 1.0 for a in accs.values()) or k in per_client:
                        raise ValueError("accuracies outside [0, 1] or a repeated reply")
                except (KeyError, TypeError, ValueError) as err:  # reported in the history, never a crash
                    entry["rejected"].append(f"node {node}: evaluation reply refused ({type(err).__name__}: {err})")
                    continue
                per_client[k] = accs
            # "client/task" keys in the in-process order: clients by id, each client's tasks in its own order
            per_pair = {f"{k}/{t}": a for k in sorted(per_client) for t, a in per_client[k].items()}
            entry |= {"acc_clients": per_pair, **summarise(per_pair, self.reference)}
            metrics = MetricRecord({"mean_acc": entry["mean_acc"]})
        entry["seconds"] = round(time.perf_counter() - self._t0, 2)
        self.history.append(entry)
        if self.on_entry is not None:
            self.on_entry(entry)
        return metrics

    # ------------------------------------------------------------------------------------ result

    def final(self, seconds_total: float) -> dict:
        """The ``final`` summary of ``federation.run`` for this strategy's history."""
        return final_summary(self.history, self.server_state_nbytes(), seconds_total)


def make_strategy(cfg: RunConfig, method: str = "matu", **kwargs) -> MethodStrategy:
    return MethodStrategy(cfg, method, **kwargs)


def write_entry(folder: Path, entry: dict) -> None:
    """Append one history entry to ``metrics.jsonl`` (same line format as ``federation.run``)."""
    with open(folder / "metrics.jsonl", "a") as f:
        f.write(json.dumps(entry) + "\n")
