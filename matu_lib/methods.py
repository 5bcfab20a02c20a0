"""MaTU and the methods it is compared with, on one interface and identical clients, splits and seeds.

Every method answers the same questions, so the runner treats them alike:
``run_round(r, sampled)`` trains and communicates (returns bytes up/down and rejected uploads),
``models()`` gives the task vector each client uses for each of its tasks, ``state_dict()`` /
``load_state_dict()`` make a run resumable, and ``server_state_nbytes()`` measures what the server keeps
between rounds (``server.held_nbytes`` over the method's server half; 0 for MaTU: the stateless claim).

Iterative methods are written as two halves: a client half (``IterativeMethod.client_update``: train, encode
an upload; ``client_models``: what the client evaluates) and a server half (``ServerHalf``: aggregate, build
downloads, keep whatever state the method needs). ``serve_round`` counts, screens and aggregates once for
every method; the in-process ``run_round`` and the Flower strategy and ClientApp drive the same halves.

Budgets are equal by construction: every trained (client, task) pair gets ``local_steps`` optimiser
steps of ``batch_size`` per round. Non-iterative methods spend the whole budget at once: ``local``
(and the one-shot mergers built on it) fine-tune ``rounds * local_steps`` steps per pair, and
``individual`` (the normalisation reference) trains each task on the pooled data of all its clients
for ``rounds * local_steps * n_holders`` steps, i.e. what the federation spends on that task in total.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import ClassVar

import torch
from torch import Tensor

from . import merging
from .aggregation import weighted_average
from .client import Client, matu_options
from .communication import Payload, add_bytes, code_vectors, compresses
from .compression import Coded, encode_with_feedback
from .modulators import unpack_mask
from .presets import RunConfig
from .server import MaTUServer, held_nbytes, screen_uploads
from .training import Data, LocalTrainer, derive_seed

Key = tuple[int, str]

# Every baseline hyper-parameter's grid, declared once; each is chosen on the validation splits, never on
# test. The merging grids live beside their mergers (``merging.COEF_GRID``, ``merging.LAMBDA_GRID``, the
# values of Wang et al.). The iterative baselines' grids are keyed by the RunConfig field they set: they are
# searched when ``RunConfig.tune_baselines`` is on (``matu_lib.tuning``), otherwise the config's value is used.
GRIDS: dict[str, tuple] = {
    "merge_coef": merging.COEF_GRID,  # task arithmetic, TIES, consensus: one coefficient for all tasks
    "tall_lambda": merging.LAMBDA_GRID,  # TALL masks: lambda_t, one per task
    "fedprox_mu": (0.001, 0.01, 0.1),  # FedProx's proximal weight
    "matfl_groups": (2, 3, 4),  # MaT-FL grouping: number of client groups
    "converged_multiple": (1, 2, 4, 8),  # individual_converged: budgets tried, in multiples of individual's
}


@dataclass
class FedContext:
    """Everything a method may read: config, shared trainer (theta_0, heads), clients, eval splits."""

    cfg: RunConfig
    trainer: LocalTrainer
    clients: list[Client]
    train: dict[str, Data]
    val: dict[str, Data]
    test: dict[str, Data]
    cache: dict = field(default_factory=dict)  # results shared between methods of one comparison

    @property
    def tasks(self) -> list[str]:
        return list(self.test)

    def holders(self, task: str) -> list[Client]:
        return [c for c in self.clients if task in c.data]


@dataclass
class RoundResult:
    bytes_up: dict[str, int] = field(default_factory=dict)
    bytes_down: dict[str, int] = field(default_factory=dict)
    rejected: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    server_seconds: float = 0.0  # wall time of the server's half of the round (``serve_round``)


class Method:
    name: ClassVar[str]
    iterative: ClassVar[bool] = True
    description: ClassVar[str] = ""
    tuned_field: ClassVar[str | None] = None  # RunConfig field searched over GRIDS[tuned_field] on validation

    def __init__(self, ctx: FedContext):
        self.ctx = ctx
        self.cfg = ctx.cfg
        self.tamper: Callable[[list[Payload]], list[Payload]] | None = None  # fault injection (tests)
        self.server: ServerHalf | None = None  # iterative methods: the server half, all the server keeps

    def run_round(self, r: int, sampled: list[int]) -> RoundResult:
        raise NotImplementedError

    def models(self) -> dict[Key, Tensor | None]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        pass

    def server_state_nbytes(self) -> int:
        """Bytes the server holds between rounds, measured on the server half (``server.held_nbytes``)."""
        return held_nbytes(self.server)


def _pairs(ctx: FedContext) -> list[Key]:
    return [(c.client_id, t) for c in ctx.clients for t in c.tasks]


# ------------------------------------------------------------------------- the protocol's two halves


class ServerHalf:
    """What a method's server does, knowing only what a real server may know: the config, the encoder size,
    the task ids and (when derivable) which tasks each client holds; never client data.

    ``serve_round`` drives it (counting, screening, aggregation, counting again), for the in-process runner
    and the Flower strategy alike. ``train_download(k)`` is what client k trains from when the server keeps
    the model (FedAvg family; None for MaTU, whose clients keep their own download), ``eval_download(k)``
    what it evaluates with. ``clients_keep_downloads`` says whether a download is the client's to keep
    (MaTU: it lives on the client, e.g. in a Flower node's ``Context.state``) or a copy of server state.

    With upload coding on (``RunConfig.upload_bits`` / ``upload_topk``), a server whose clients train from its
    downloads (``receives_updates``) receives coded *updates*, trained minus what client k was sent, and
    ``absorb`` adds back ``train_download(k)``, which it knows. With download coding on, ``keep`` stores a new
    state vector as it travels: the server adopts the decoded vector (what every client receives) and keeps its
    codes for the downloads (``download``), so server and clients hold the same numbers.
    """

    clients_keep_downloads: ClassVar[bool] = False
    # True where whoever drives the server decoded the uploads itself and keeps no reference to them (the Flower
    # strategy: ``Payload.from_bytes`` per reply): MaTU's round may then write each download over its client's
    # upload, which saves a round's worth of new memory (``MaTUServer.aggregate(consume=True)``)
    owns_uploads: bool = False
    receives_updates: ClassVar[bool] = False
    vectors: ClassVar[frozenset[str]] = frozenset({"model"})  # the vectors every upload carries

    def __init__(
        self, cfg: RunConfig, n_params: int, tasks: Sequence[str], holdings: dict[int, tuple[str, ...]] | None
    ) -> None:
        self.cfg, self.n_params, self.tasks, self.holdings = cfg, n_params, list(tasks), holdings
        self.codes: dict[str, Coded] = {}  # codes of state vectors, by state key (download coding only)
        self.start()

    def absorb(self, accepted: list[Payload]) -> list[Payload]:
        """Coded updates back into trained vectors (start + update); uploads unchanged when nothing is coded."""
        if not (self.receives_updates and compresses(self.cfg.upload_bits, self.cfg.upload_topk)):
            return accepted
        out = []
        for u in accepted:
            start = self.train_download(u.client_id)
            base = {} if start is None else start.vectors
            vectors = {n: v + base[n] if n in base else v for n, v in u.vectors.items()}
            out.append(Payload(u.client_id, u.tasks, vectors, u.masks, u.rescalers, u.counts, u.sketches))
        return out

    def keep(self, keys: Sequence[str], vector: Tensor) -> Tensor:
        """``vector`` as state under ``keys`` (several keys share one coding): itself, or with download coding
        on, its decoded form, the codes kept for ``download``."""
        coded = code_vectors({"v": vector}, self.cfg.download_bits, self.cfg.download_topk, self.cfg.code_block)
        if not coded:
            return vector
        for key in keys:
            self.codes[key] = coded["v"]
        return coded["v"].decode()

    def download(self, k: int, tasks: tuple[str, ...], vectors: dict[str, tuple[str, Tensor]]) -> Payload:
        """A download of state vectors ``{name: (state key, vector)}``, coded where the state was kept coded."""
        return Payload(
            k,
            tasks,
            {n: v for n, (_, v) in vectors.items()},
            coded={n: self.codes[key] for n, (key, _) in vectors.items() if key in self.codes},
        )

    def code_state(self) -> dict[str, Tensor]:
        """The kept codes as tensors (for checkpoints): a resumed run sends the very same bytes."""
        return {
            f"codes/{key}": torch.frombuffer(bytearray(c.to_bytes()), dtype=torch.uint8)
            for key, c in self.codes.items()
        }

    def load_code_state(self, state: dict[str, Tensor]) -> None:
        self.codes = {
            key[len("codes/") :]: Coded.from_bytes(bytes(t.numpy().tobytes()), self.n_params)
            for key, t in state.items()
            if key.startswith("codes/")
        }

    def start(self) -> None:
        """Create the state the server starts a run with (none by default)."""

    def vector_names(self, upload: Payload) -> set[str]:
        return set(self.vectors)

    def aggregate(self, accepted: list[Payload], sampled: list[int]) -> tuple[dict[int, Payload], dict]:
        raise NotImplementedError

    def train_download(self, k: int) -> Payload | None:
        return None

    def eval_download(self, k: int) -> Payload | None:
        return self.train_download(k)

    def state_dict(self) -> dict[str, Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        pass


def serve_round(
    server: ServerHalf, uploads: list[Payload], senders: list[int], sampled: list[int]
) -> tuple[RoundResult, dict[int, Payload]]:
    """The server half of one round, written once: count every upload's bytes, screen the uploads against
    what the server knows (``senders[i]`` sent ``uploads[i]``, as the transport says), aggregate the accepted
    ones, count every download's bytes. Returns the round's result and the downloads by client id."""
    res = RoundResult()
    t0 = time.perf_counter()
    for up in uploads:
        add_bytes(res.bytes_up, up)
    holdings = None if server.holdings is None else {k: set(ts) for k, ts in server.holdings.items()}
    accepted, res.rejected = screen_uploads(
        uploads, server.n_params, set(server.tasks), server.vector_names, senders=list(senders), holdings=holdings
    )
    downloads, res.info = server.aggregate(server.absorb(accepted), sampled)
    for down in downloads.values():
        add_bytes(res.bytes_down, down)
    res.server_seconds = time.perf_counter() - t0  # screening, decoding, aggregation and coding the downloads
    return res, downloads


class IterativeMethod(Method):
    """An iterative method as its two halves: ``client_update`` (train, encode an upload; a classmethod, so a
    Flower ClientApp runs the very same code) and a ``ServerHalf``. ``run_round`` wires them in-process."""

    server_half: ClassVar[type[ServerHalf]]

    def __init__(self, ctx: FedContext):
        super().__init__(ctx)
        holdings = {cl.client_id: cl.tasks for cl in ctx.clients}
        self.server = self.server_half(ctx.cfg, ctx.trainer.n_params, ctx.tasks, holdings)
        for cl in ctx.clients:  # a new run starts from theta_0 on every client, with no error feedback yet
            cl.download, cl.residual, cl.learned, cl.kept = None, {}, {}, {}

    @classmethod
    def client_update(
        cls, cfg: RunConfig, trainer: LocalTrainer, client: Client, r: int, download: Payload | None
    ) -> Payload:
        """Client half: train from ``download`` (or from what the client keeps) and encode the upload."""
        upload = cls.train_upload(cfg, trainer, client, r, download)
        if not (cls.server_half.receives_updates and compresses(cfg.upload_bits, cfg.upload_topk)):
            return upload
        return code_update(cfg, client, upload, download)

    @classmethod
    def train_upload(
        cls, cfg: RunConfig, trainer: LocalTrainer, client: Client, r: int, download: Payload | None
    ) -> Payload:
        """Train from ``download`` and return the trained vectors as an upload (before any coding)."""
        raise NotImplementedError

    @classmethod
    def client_models(cls, cfg: RunConfig, client: Client, download: Payload | None) -> dict[str, Tensor | None]:
        """Client half: the task vector the client uses for each of its tasks, given its eval download."""
        raise NotImplementedError

    def run_round(self, r: int, sampled: list[int]) -> RoundResult:
        clients, server = self.ctx.clients, self.server
        uploads = [
            self.client_update(self.cfg, self.ctx.trainer, clients[k], r, server.train_download(k)) for k in sampled
        ]
        if self.tamper:  # fault injection: the list stays aligned with ``sampled``
            uploads = self.tamper(uploads)
        res, downloads = serve_round(server, uploads, sampled, sampled)
        if server.clients_keep_downloads:
            for k, down in downloads.items():
                clients[k].download = down
        return res

    def models(self) -> dict[Key, Tensor | None]:
        out = {}
        for cl in self.ctx.clients:
            models = self.client_models(self.cfg, cl, self.server.eval_download(cl.client_id))
            out.update({(cl.client_id, t): models[t] for t in cl.tasks})
        return out

    def state_dict(self) -> dict[str, Tensor]:
        out = {**self.server.state_dict(), **self.server.code_state()}
        for cl in self.ctx.clients:  # coded updates' error feedback (client state, in the checkpoint)
            out.update({f"client{cl.client_id}/residual/{n}": e for n, e in cl.residual.items()})
        return out

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.server.load_state_dict(state)
        self.server.load_code_state(state)
        for cl in self.ctx.clients:
            prefix = f"client{cl.client_id}/residual/"
            cl.residual = {key[len(prefix) :]: e for key, e in state.items() if key.startswith(prefix)}


def _counts(client: Client) -> dict[str, int]:
    return {t: client.count(t) for t in client.tasks}


def code_update(cfg: RunConfig, client: Client, upload: Payload, download: Payload | None) -> Payload:
    """The upload as coded updates: per vector, trained minus the start the client received, plus the error
    feedback residual (``cfg.error_feedback``), coded as ``cfg`` says; the residual keeps what coding dropped."""
    coded = {}
    for name, trained in upload.vectors.items():
        start = download.vectors.get(name) if download is not None else None
        update = trained if start is None else trained - start
        residual = client.residual.get(name) if cfg.error_feedback else None
        coded[name], dropped = encode_with_feedback(update, residual, cfg.upload_bits, cfg.upload_topk, cfg.code_block)
        if cfg.error_feedback:
            client.residual[name] = dropped
    return Payload(upload.client_id, upload.tasks, {}, counts=upload.counts, coded=coded)


# ---------------------------------------------------------------------------------------------- MaTU


class MaTUServerHalf(ServerHalf):
    """The stateless ``MaTUServer``: it holds its options and nothing else; every download is the client's."""

    clients_keep_downloads = True
    vectors = frozenset({"unified"})

    def start(self) -> None:
        self.matu = MaTUServer.from_config(self.cfg)

    def aggregate(self, accepted: list[Payload], sampled: list[int]) -> tuple[dict[int, Payload], dict]:
        return self.matu.aggregate(accepted, consume=self.owns_uploads)


class MaTU(IterativeMethod):
    name = "matu"
    description = (
        "unified task vector per client + masks/rescalers, client-side error feedback; stateless server "
        "(similarity-based transfer optional)"
    )
    server_half = MaTUServerHalf

    @classmethod
    def client_update(
        cls, cfg: RunConfig, trainer: LocalTrainer, client: Client, r: int, download: Payload | None
    ) -> Payload:
        """MaTU trains from the download the client keeps (``client.download``), never from the server."""
        return client.matu_round(trainer, cfg.local_steps, derive_seed(cfg.seed, r), **matu_options(cfg))

    @classmethod
    def client_models(cls, cfg: RunConfig, client: Client, download: Payload | None) -> dict[str, Tensor | None]:
        return {t: client.model(t, cfg.fill_dropped) for t in client.tasks}

    def state_dict(self) -> dict[str, Tensor]:
        out = {}
        for cl in self.ctx.clients:
            if cl.download is not None:
                out[f"client{cl.client_id}/unified"] = cl.download.vectors["unified"]
                out.update({f"client{cl.client_id}/mask/{t}": m for t, m in cl.download.masks.items()})
                out.update(
                    {f"client{cl.client_id}/rescaler/{t}": torch.tensor([s]) for t, s in cl.download.rescalers.items()}
                )
            out.update({f"client{cl.client_id}/residual/{t}": e for t, e in cl.residual.items()})
            out.update({f"client{cl.client_id}/learned/{t}": u for t, u in cl.learned.items()})
            out.update({f"client{cl.client_id}/kept/{t}": v for t, v in cl.kept.items()})
        return out

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for cl in self.ctx.clients:
            prefix = f"client{cl.client_id}/"
            cl.residual = {t: state[f"{prefix}residual/{t}"] for t in cl.tasks if f"{prefix}residual/{t}" in state}
            cl.learned = {t: state[f"{prefix}learned/{t}"] for t in cl.tasks if f"{prefix}learned/{t}" in state}
            cl.kept = {t: state[f"{prefix}kept/{t}"] for t in cl.tasks if f"{prefix}kept/{t}" in state}
            if prefix + "unified" not in state:
                cl.download = None
                continue
            masks = {t: state[f"{prefix}mask/{t}"] for t in cl.tasks if f"{prefix}mask/{t}" in state}
            scales = {t: float(state[f"{prefix}rescaler/{t}"]) for t in cl.tasks if f"{prefix}rescaler/{t}" in state}
            cl.download = Payload(cl.client_id, cl.tasks, {"unified": state[prefix + "unified"]}, masks, scales, {})


# ------------------------------------------------------------------------------- no-communication


class ZeroShot(Method):
    name, iterative = "zero_shot", False
    description = "the pretrained encoder with zero-shot heads, no training"

    def run_round(self, r: int, sampled: list[int]) -> RoundResult:
        return RoundResult()

    def models(self) -> dict[Key, Tensor | None]:
        return {key: None for key in _pairs(self.ctx)}


def local_task_vectors(ctx: FedContext) -> dict[Key, Tensor]:
    """Each client fine-tunes each of its tasks alone for the whole budget (memoised per context)."""
    if "local" not in ctx.cache:
        c = ctx.cfg
        ctx.cache["local"] = {
            (cl.client_id, t): ctx.trainer.train_task(
                None, t, cl.data[t], c.rounds * c.local_steps, derive_seed(c.seed, "local", cl.client_id, t)
            )
            for cl in ctx.clients
            for t in cl.tasks
        }
    return ctx.cache["local"]


class Local(Method):
    name, iterative = "local", False
    description = "each client fine-tunes each task on its own data, no communication"

    def run_round(self, r: int, sampled: list[int]) -> RoundResult:
        self.vectors = local_task_vectors(self.ctx)
        return RoundResult()

    def models(self) -> dict[Key, Tensor | None]:
        return dict(self.vectors)


def individual_task_vectors(ctx: FedContext) -> dict[str, Tensor]:
    """Per-task fine-tuning on pooled data with the federation's total budget for that task (memoised)."""
    if "individual" not in ctx.cache:
        c = ctx.cfg
        ctx.cache["individual"] = {
            t: ctx.trainer.train_task(
                None,
                t,
                ctx.train[t],
                c.rounds * c.local_steps * len(ctx.holders(t)),
                derive_seed(c.seed, "individual", t),
            )
            for t in ctx.tasks
        }
    return ctx.cache["individual"]


class Individual(Method):
    name, iterative = "individual", False
    description = "one model per task fine-tuned on the pooled data (normalisation reference, not federated)"

    def run_round(self, r: int, sampled: list[int]) -> RoundResult:
        self.vectors = individual_task_vectors(self.ctx)
        return RoundResult()

    def models(self) -> dict[Key, Tensor | None]:
        return {(k, t): self.vectors[t] for k, t in _pairs(self.ctx)}


def converged_task_vectors(ctx: FedContext) -> tuple[dict[str, Tensor], dict[str, dict]]:
    """Per-task fine-tuning on pooled data trained until validation accuracy stops improving (memoised).

    The budgets are ``GRIDS["converged_multiple"]`` times ``individual``'s, tried in order; each is its own run
    (the learning-rate schedule decays over the whole run, so a longer run is not a continuation), and the first
    budget whose validation accuracy does not beat the previous one ends the search. The 1x budget is
    ``individual``'s run itself. Returns the chosen vectors and, per task, the validation score of each budget
    tried and the chosen one.
    """
    if "individual_converged" not in ctx.cache:
        c, same_budget = ctx.cfg, individual_task_vectors(ctx)
        vectors, choice = {}, {}
        for t in ctx.tasks:
            steps = c.rounds * c.local_steps * len(ctx.holders(t))
            tried: list[tuple[int, float]] = []
            best = None
            for multiple in GRIDS["converged_multiple"]:
                vec = (
                    same_budget[t]
                    if multiple == 1
                    else ctx.trainer.train_task(
                        None, t, ctx.train[t], multiple * steps, derive_seed(c.seed, "individual", t)
                    )
                )
                score = ctx.trainer.evaluate(vec, t, ctx.val[t], c.eval_batch_size)
                tried.append((multiple * steps, score))
                if best is not None and score <= best[1]:
                    break
                best = (multiple * steps, score, vec)
            vectors[t] = best[2]
            choice[t] = {"steps": best[0], "val_by_steps": [list(x) for x in tried]}
        ctx.cache["individual_converged"] = (vectors, choice)
    return ctx.cache["individual_converged"]


class IndividualConverged(Individual):
    name = "individual_converged"
    description = (
        "one model per task fine-tuned on the pooled data until validation accuracy stops improving "
        "(steps chosen on validation; not federated)"
    )

    def run_round(self, r: int, sampled: list[int]) -> RoundResult:
        self.vectors, choice = converged_task_vectors(self.ctx)
        return RoundResult(info={"steps_chosen_on_val": choice})


# ------------------------------------------------------------------------------- FedAvg family


class FedAvgServerHalf(ServerHalf):
    """One global task vector, the sample-weighted average of the accepted uploads (stateful: 4P bytes)."""

    receives_updates = True

    def start(self) -> None:
        self.global_delta = torch.zeros(self.n_params)

    def aggregate(self, accepted: list[Payload], sampled: list[int]) -> tuple[dict[int, Payload], dict]:
        if accepted:
            self.global_delta = self.keep(
                ["global"],
                weighted_average([u.vectors["model"] for u in accepted], [sum(u.counts.values()) for u in accepted]),
            )
        return {k: self.train_download(k) for k in sampled}, {}  # every sampled client

    def train_download(self, k: int) -> Payload | None:
        return self.download(k, (), {"model": ("global", self.global_delta)})

    def state_dict(self) -> dict[str, Tensor]:
        return {"global": self.global_delta}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.global_delta = state["global"]


class FedAvg(IterativeMethod):
    name = "fedavg"
    description = "one shared model for all tasks; clients train it round-robin over their tasks"
    server_half = FedAvgServerHalf

    @classmethod
    def prox_mu(cls, cfg: RunConfig) -> float:
        return 0.0

    @classmethod
    def train_upload(
        cls, cfg: RunConfig, trainer: LocalTrainer, client: Client, r: int, download: Payload | None
    ) -> Payload:
        start = download.vectors["model"] if download is not None else torch.zeros(trainer.n_params)
        delta = trainer.train_multitask(
            start, client.data, cfg.local_steps, derive_seed(cfg.seed, r, client.client_id), cls.prox_mu(cfg)
        )
        return Payload(client.client_id, client.tasks, {"model": delta}, counts=_counts(client))

    @classmethod
    def client_models(cls, cfg: RunConfig, client: Client, download: Payload | None) -> dict[str, Tensor | None]:
        model = download.vectors["model"] if download is not None else None
        return {t: model for t in client.tasks}


class FedProx(FedAvg):
    name, tuned_field = "fedprox", "fedprox_mu"
    description = "FedAvg with a proximal term mu/2 ||w - w_global||^2 in local training"

    @classmethod
    def prox_mu(cls, cfg: RunConfig) -> float:
        return cfg.fedprox_mu


class PerTaskServerHalf(ServerHalf):
    """One model per task, each the sample-weighted average of that task's accepted vectors (stateful: T * 4P)."""

    receives_updates = True

    def start(self) -> None:
        self.task_delta = {t: torch.zeros(self.n_params) for t in self.tasks}

    def vector_names(self, upload: Payload) -> set[str]:
        return {f"task:{t}" for t in upload.tasks} if isinstance(upload.tasks, tuple) else set()

    def aggregate(self, accepted: list[Payload], sampled: list[int]) -> tuple[dict[int, Payload], dict]:
        for t in self.tasks:
            ups = [u for u in accepted if t in u.tasks]
            if ups:
                self.task_delta[t] = self.keep(
                    [f"task/{t}"], weighted_average([u.vectors[f"task:{t}"] for u in ups], [u.counts[t] for u in ups])
                )
        return {k: down for k in sampled if (down := self.train_download(k)) is not None}, {}

    def _tasks_of(self, k: int) -> tuple[str, ...] | None:
        return None if self.holdings is None else tuple(self.holdings.get(k, ()))

    def train_download(self, k: int) -> Payload | None:
        tasks = self._tasks_of(k)
        if tasks is None:  # who holds what is not derivable: send every task's model
            tasks = tuple(self.tasks)
        return self.download(k, tasks, {f"task:{t}": (f"task/{t}", self.task_delta[t]) for t in tasks})

    def state_dict(self) -> dict[str, Tensor]:
        return {f"task/{t}": v for t, v in self.task_delta.items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.task_delta = {t: state[f"task/{t}"] for t in self.tasks}


class PerTaskFedAvg(IterativeMethod):
    name = "per_task_fedavg"
    description = "the server keeps one model per task and averages each task's updates (stateful)"
    server_half = PerTaskServerHalf

    @classmethod
    def train_upload(
        cls, cfg: RunConfig, trainer: LocalTrainer, client: Client, r: int, download: Payload | None
    ) -> Payload:
        k = client.client_id
        vecs = {
            f"task:{t}": trainer.train_task(
                cls._start(download, t, trainer.n_params),
                t,
                client.data[t],
                cfg.local_steps,
                derive_seed(cfg.seed, r, k, t),
            )
            for t in client.tasks
        }
        return Payload(k, client.tasks, vecs, counts=_counts(client))

    @staticmethod
    def _start(download: Payload | None, task: str, n_params: int) -> Tensor:
        if download is None or f"task:{task}" not in download.vectors:
            return torch.zeros(n_params)
        return download.vectors[f"task:{task}"]

    @classmethod
    def client_models(cls, cfg: RunConfig, client: Client, download: Payload | None) -> dict[str, Tensor | None]:
        return {t: None if download is None else download.vectors[f"task:{t}"] for t in client.tasks}


class MaTFLServerHalf(ServerHalf):
    """MaT-FL grouping: cluster the accepted clients by the cosine of their updates, average within groups; the
    server keeps every client's group model (stateful: n_clients * 4P)."""

    receives_updates = True

    def start(self) -> None:
        self.client_delta = {k: torch.zeros(self.n_params) for k in range(self.cfg.n_clients)}

    def aggregate(self, accepted: list[Payload], sampled: list[int]) -> tuple[dict[int, Payload], dict]:
        from sklearn.cluster import AgglomerativeClustering

        from .aggregation import similarity_matrix

        if not accepted:
            return {}, {}
        updates = [u.vectors["model"] - self.client_delta[u.client_id] for u in accepted]
        groups = min(self.cfg.matfl_groups, len(accepted))
        if groups > 1:
            distance = (1 - similarity_matrix(updates, "cosine")).clamp_min(0).numpy()
            labels = AgglomerativeClustering(n_clusters=groups, metric="precomputed", linkage="average").fit_predict(
                distance
            )
        else:
            labels = [0] * len(accepted)
        downloads = {}
        for g in set(labels):
            members = [u for u, lab in zip(accepted, labels) if lab == g]
            avg = self.keep(
                [f"client/{u.client_id}" for u in members],
                weighted_average([u.vectors["model"] for u in members], [sum(u.counts.values()) for u in members]),
            )
            for u in members:
                self.client_delta[u.client_id] = avg
                downloads[u.client_id] = self.train_download(u.client_id)
        return downloads, {"groups": {str(u.client_id): int(lab) for u, lab in zip(accepted, labels)}}  # JSON keys

    def train_download(self, k: int) -> Payload | None:
        return self.download(k, (), {"model": (f"client/{k}", self.client_delta[k])})

    def state_dict(self) -> dict[str, Tensor]:
        return {f"client/{k}": v for k, v in self.client_delta.items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.client_delta = {k: state[f"client/{k}"] for k in self.client_delta}


class MaTFLGrouping(FedAvg):
    name, tuned_field = "matfl_grouping", "matfl_groups"
    description = "MaT-FL-style: cluster clients by the cosine of their updates, average within groups (stateful)"
    server_half = MaTFLServerHalf


# ------------------------------------------------------------------------------- one-shot merging


class OneShotMerge(Method):
    """Clients fine-tune locally (full budget), upload every task vector once; the server averages per task
    and merges across tasks. Hyper-parameters are chosen on the validation splits, never on test, and the
    grid, every candidate's validation score and the choice go into the round's ``info`` (metrics.json)."""

    iterative = False
    merger: ClassVar[str]
    grid_axes: ClassVar[tuple[str, ...]] = ("coef",)

    def coef_grid(self) -> tuple[float, ...]:
        return self.cfg.merge_coefs if self.cfg.merge_coefs is not None else GRIDS["merge_coef"]

    def val_task_score(self, result: merging.MergeResult, i: int) -> float:
        t = self.ctx.tasks[i]
        return self.ctx.trainer.evaluate(result.per_task(i), t, self.ctx.val[t], self.cfg.eval_batch_size)

    def val_mean_score(self, result: merging.MergeResult) -> float:
        return sum(self.val_task_score(result, i) for i in range(len(self.ctx.tasks))) / len(self.ctx.tasks)

    def select(self, averaged: list[Tensor]) -> tuple[merging.MergeResult, dict]:
        """One choice for all tasks: the grid point with the best mean validation accuracy."""
        build = partial(merging.MERGERS[self.merger], averaged)
        candidates = merging.grid(coef=self.coef_grid()) if self.grid_axes else [{}]
        best, score, scores = merging.select_on_validation(self.val_mean_score, candidates, build)
        return build(**best), {"selected": best, "val_score": score, "grid": [[k, s] for k, s in scores]}

    def run_round(self, r: int, sampled: list[int]) -> RoundResult:
        res, ctx = RoundResult(), self.ctx
        local = local_task_vectors(ctx)
        uploads = [
            Payload(
                cl.client_id,
                cl.tasks,
                {f"task:{t}": local[(cl.client_id, t)] for t in cl.tasks},
                counts={t: cl.count(t) for t in cl.tasks},
            )
            for cl in ctx.clients
        ]
        for up in uploads:
            add_bytes(res.bytes_up, up)
        averaged = per_task_averages(ctx)
        self.result, res.info = self.select(averaged)
        self.task_index = {t: i for i, t in enumerate(ctx.tasks)}
        for cl in ctx.clients:  # download: merged vector + per-task state (masks, rescalers) of the client's tasks
            add_bytes(res.bytes_down, merge_download(self.result, cl.client_id, cl.tasks, self.task_index))
        return res

    def models(self) -> dict[Key, Tensor | None]:
        return {(k, t): self.result.per_task(self.task_index[t]) for k, t in _pairs(self.ctx)}


def merge_download(
    result: merging.MergeResult, client_id: int, tasks: tuple[str, ...], task_index: dict[str, int]
) -> Payload:
    """A one-shot merger's download to one client as a ``Payload``, so its bytes are serialised bytes: the merged
    vector, and for each of the client's tasks the merger's per-task state (TALL's mask, EMR's mask and rescaler)."""
    n = result.merged.numel()
    masks = {t: unpack_mask(result.masks[task_index[t]], n) for t in tasks} if result.masks else {}
    scales = {t: result.rescalers[task_index[t]] for t in tasks} if result.rescalers else {}
    return Payload(client_id, tasks, {"merged": result.merged}, masks, scales)


def per_task_averages(ctx: FedContext) -> list[Tensor]:
    """The server's input to every merger: each task's local vectors averaged over its holders (by sample count)."""
    local = local_task_vectors(ctx)
    return [
        weighted_average([local[(c.client_id, t)] for c in ctx.holders(t)], [c.count(t) for c in ctx.holders(t)])
        for t in ctx.tasks
    ]


def tall_lambdas(method: OneShotMerge, averaged: list[Tensor]) -> dict:
    """TALL's lambda_t, chosen per task on validation from GRIDS["tall_lambda"] (as ``find_optimal_mask`` in
    Wang et al.'s code); memoised per context, since consensus merging reuses the same masks."""
    ctx = method.ctx
    if "tall_lambdas" not in ctx.cache:
        tasks = ctx.tasks
        best, scores, table = merging.select_per_task(
            method.val_task_score,
            merging.grid(lam=GRIDS["tall_lambda"]),
            partial(merging.tall_masks, averaged),
            len(tasks),
        )
        ctx.cache["tall_lambdas"] = {
            "lam": {t: b["lam"] for t, b in zip(tasks, best)},
            "val_score": sum(scores) / len(scores),
            "grid": [[kw, dict(zip(tasks, row))] for kw, row in table],  # per-task validation accuracy per lambda
        }
    return ctx.cache["tall_lambdas"]


class TaskArithmetic(OneShotMerge):
    name, merger = "task_arithmetic", "task_arithmetic"
    description = "one-shot: theta_0 + coef * sum of per-task averaged vectors"


class Ties(OneShotMerge):
    name, merger = "ties", "ties"
    description = "one-shot TIES-Merging (trim 20%, elect, disjoint mean)"


class TallMasks(OneShotMerge):
    name, merger = "tall_masks", "tall_masks"
    description = "one-shot TALL masks: task t uses theta_0 + m_t * sum of vectors, lambda_t chosen per task"

    def select(self, averaged: list[Tensor]) -> tuple[merging.MergeResult, dict]:
        chosen = tall_lambdas(self, averaged)
        result = merging.tall_masks(averaged, lam=[chosen["lam"][t] for t in self.ctx.tasks])
        return result, {"selected": {"lam": chosen["lam"]}, "val_score": chosen["val_score"], "grid": chosen["grid"]}


class Consensus(OneShotMerge):
    name, merger = "consensus", "consensus"
    description = "one-shot consensus merging: sum kept where >= 2 TALL masks agree, coefficient on validation"
    k: ClassVar[int] = 2  # drop "selfish" (one mask) and "catastrophic" (no mask) weights, as the paper

    def select(self, averaged: list[Tensor]) -> tuple[merging.MergeResult, dict]:
        lam = tall_lambdas(self, averaged)["lam"]
        build = partial(merging.consensus, averaged, lam=[lam[t] for t in self.ctx.tasks], k=self.k)
        best, score, scores = merging.select_on_validation(
            self.val_mean_score, merging.grid(coef=self.coef_grid()), build
        )
        return build(**best), {
            "selected": {**best, "lam": lam, "k": self.k},
            "val_score": score,
            "grid": [[k, s] for k, s in scores],
        }


class EMR(OneShotMerge):
    name, merger, grid_axes = "emr", "emr", ()
    description = "one-shot EMR-Merging of per-task averages (tuning-free); MaTU's operators without federation"


METHODS: dict[str, type[Method]] = {
    m.name: m
    for m in (
        MaTU,
        ZeroShot,
        Local,
        Individual,
        IndividualConverged,
        FedAvg,
        FedProx,
        PerTaskFedAvg,
        MaTFLGrouping,
        TaskArithmetic,
        Ties,
        TallMasks,
        Consensus,
        EMR,
    )
}
