"""Named run presets: one frozen dataclass, validated, with every open design choice as a named option.

    cfg = preset("cpu", seed=1, rounds=3)     # unknown keys raise; values are checked in __post_init__

Presets (docs/presets.md; the demo's timings: docs/performance.md):
- ``smoke``   : tests; 4 tasks, 4 clients holding 2 each, 2 rounds; small enough for < 60 s per method.
- ``cpu``     : the workbook's offline default; 12 tasks from 5 families, 12 clients holding 4 each (up to 60
  train samples per client and task), every task on 4 clients, no client with two tasks of one family.
- ``cpu-full``: all 30+ offline tasks, 12 clients; for analysts with time.
- ``gpu``     : ViT-B-32 ``openai`` on the real datasets with the literature's recipe; needs the network
  once (weights, datasets) and a GPU.
"""

from __future__ import annotations

import ast
import math
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .communication import MAX_SKETCH_BITS

# The MaTU options that the paper leaves open (the paper's body is not available; see docs/method.md).
ELECT_RULES = ("sum", "majority")
TIE_RULES = ("negative", "positive", "zero")
MAGNITUDES = ("max", "mean")
SIMILARITIES = ("cosine", "sign", "sketch")
SKETCH_CENTERS = ("none", "client")
SCOPES = ("client", "global")
FILLS = ("none", "start", "model")  # what fills the coordinates a task's mask drops (``fill_dropped``)
CODE_BITS = (32, 8, 4, 2, 1)  # bits per entry of a coded vector (compression.BITS)
# Fields added after results were first written, with the value that does what runs did before them (a config
# at that value names the same run as before; ``sketch_center``'s default is no longer that value).
LATER_FIELDS = {
    "upload_bits": 32,
    "upload_topk": 1.0,
    "download_bits": 32,
    "download_topk": 1.0,
    "code_block": 4096,
    "sketch_center": "none",
    "fill_dropped": "none",
}
# Fields that only MaTU's clients read: another method's run is the same run whatever their value, so its identity
# leaves them out and a saved run is compared without them (choosing a MaTU option never retrains a baseline).
MATU_ONLY_FIELDS = frozenset({"sketch_center", "fill_dropped"})
MAX_SEED = 2**32 - 1  # seeds feed numpy and torch generators, alone and in sums; both take this range
DEVICE_PATTERN = re.compile(r"cpu|cuda|cuda:\d+|mps")


class ConfigError(ValueError):
    """A run config that cannot run as given; the message is one line naming the field, the value and what is
    accepted, so command lines print it as it is."""


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# 12 tasks in 5 families (the ground truth of the similarity heatmaps): handwritten digits, animals, counting and
# position, colour, faces. Each is a task that per-task fine-tuning of `matu-lite0` learns (individual >= zero-shot
# + 0.10 on validation). Left out for that reason: the printed glyphs (zero-shot is above what 240 images fine-tune to),
# textures (zero-shot at the ceiling), shapes, arrow_direction and object_count (data/results/cpu-substrate.md,
# docs/substrate.md).
CPU_TASKS = (
    "mnist",
    "mnist_rotated",
    "sklearn_digits",
    "animals",
    "animals_inverted",
    "animals_farm",
    "dot_count",
    "object_position",
    "ink_colour",
    "colours",
    "faces",
    "faces_tinted",
)


@dataclass(frozen=True)
class RunConfig:
    preset: str = "custom"
    seed: int = 0
    # backbone and data
    model: str = "matu-tiny"
    pretrained: str | None = "synthetic"
    dataset: str = "offline"  # "offline" suite or "real" torchvision datasets (GPU preset)
    download: bool = False  # real datasets only: let torchvision download missing files
    tasks: tuple[str, ...] | None = CPU_TASKS  # None: every task of the suite
    max_train_per_task: int | None = None
    device: str = "cpu"
    # federation
    n_clients: int = 6
    tasks_per_client: tuple[int, int] = (2, 4)
    # A client avoids holding two tasks of one family (related tasks then meet only at the server).
    spread_families: bool = True
    min_clients_per_task: int = 1
    split: str = "iid"  # how a shared task's samples are split: "iid" | "dirichlet"
    dirichlet_alpha: float = 0.5
    participation: float = 1.0  # fraction of clients sampled per round
    rounds: int = 5
    local_steps: int = 12  # optimiser steps per task per round
    batch_size: int = 64
    lr: float = 5e-4  # matu-tiny's rate, chosen on validation (data/results/cpu-substrate.md)
    weight_decay: float = 0.1
    warmup_steps: int = 3
    grad_clip: float = 1.0
    eval_every: int = 1
    eval_split: str = "test"  # "val" when tuning hyper-parameters (never tune on test)
    eval_batch_size: int = 512
    # MaTU options (all ablatable)
    elect_rule: str = "sum"
    tie_rule: str = "negative"
    # Elected magnitude over the agreeing tasks: "max" (EMR) or "mean" (TIES); chosen on the cpu preset's
    # validation splits (data/results/cpu-validation-magnitude.md).
    magnitude: str = "mean"
    # What the server compares: "cosine" / "sign" of the averaged task vectors, or "sketch": sign sketches of
    # each task's update in this round (clients send ``sketch_bits`` bits per task; 0 sends none).
    similarity: str = "cosine"
    sketch_bits: int = 4096  # 512 bytes per task and round, counted in the upload
    sketch_source: str = "cumulative"  # "round": this round's update; "cumulative": the client's updates so far
    # "client": each task's update is scaled to unit length and the client's mean over its tasks subtracted
    # before sketching (aggregation.centre_updates), so the sketch keeps what is particular to the task and
    # drops what every task of that client moved along; "none": the update as it is. Chosen by the family ARI
    # of the server's sketch similarity on the cpu preset (data/results/cpu-validation-sketch_center.md,
    # docs/method.md).
    sketch_center: str = "client"
    # Off by default: chosen on the cpu preset's validation splits (data/results/cpu-validation-transfer.md).
    transfer: bool = False
    transfer_temperature: float = 0.1
    transfer_threshold: float = 0.0
    use_masks: bool = True
    use_rescalers: bool = True
    unified_scope: str = "client"  # one unified vector per client, or one for the whole federation
    # Clients carry what unification dropped into their next upload (client state; the server stays
    # stateless). On the cpu preset's validation splits it is level with no feedback
    # (data/results/cpu-validation-error_feedback.md); a default changes only on a paired interval above zero.
    error_feedback: bool = True
    # Where a task's mask drops a coordinate, the modulated vector holds 0 there. "none" (the method as the rest of
    # the reconstruction describes it): the client trains from, and uses, the modulated vector as it is. "start":
    # it trains from the modulated vector with the dropped coordinates filled from its own last trained vector of
    # that task (client state, never sent), and uses the modulated vector; "model": it also uses the filled vector.
    # The upload and the stateless server are the same in all three (docs/method.md). Chosen on the cpu preset's
    # validation splits, 3 seeds (data/results/cpu-validation-fill_dropped.md).
    fill_dropped: str = "model"
    # Communication: how vectors travel (compression.encode). Uploads: the top ``upload_topk`` fraction of
    # entries by magnitude, quantised to ``upload_bits`` per entry (32: float32 as is; 8, 4, 2; 1: signs), one
    # float32 scale per ``code_block`` entries; clients' error feedback absorbs what coding drops. Downloads:
    # likewise, without feedback (MaTU's server keeps no state). Every iterative method codes its vectors with
    # the same setting (FedAvg-family clients then send coded updates, trained minus received).
    upload_bits: int = 32
    upload_topk: float = 1.0
    download_bits: int = 32
    download_topk: float = 1.0
    code_block: int = 4096
    # baselines (their grids are declared once, in methods.GRIDS)
    # The grids' middle values; a preset fixes the values chosen on its validation splits from methods.GRIDS
    # (`python -m matu_lib.tuning`, e.g. data/results/cpu-baseline-tuning.json); `compare --tune` re-chooses
    # them per run instead.
    fedprox_mu: float = 0.01
    matfl_groups: int = 3
    # Opt-in: choose fedprox_mu / matfl_groups on validation from methods.GRIDS (one run per grid value,
    # then the chosen value's run on eval_split); off, the two values above are used as they are.
    tune_baselines: bool = False
    merge_coefs: tuple[float, ...] | None = None  # None: methods.GRIDS["merge_coef"]; a subset only to save time

    def __post_init__(self) -> None:
        """Every value is checked for range and meaning here, so a config that exists can run: a negative
        sample cap, a repeated task or an infinite learning rate is refused before any folder is written."""
        for field, value, ok, accepted in self._range_checks():
            if not ok:
                raise ConfigError(f"invalid run config: {field} must be {accepted}, got {value!r}")

    def _range_checks(self) -> list[tuple[str, object, bool, str]]:
        """(field, value, ok, what is accepted) for every field whose range the type alone does not fix. Whether
        the tasks exist and the partition can be built depends on the task registry: ``check_runnable``."""
        fin = _finite
        lo, hi = self.tasks_per_client
        repeated = sorted({t for t in self.tasks or () if self.tasks.count(t) > 1})
        return [
            ("seed", self.seed, 0 <= self.seed <= MAX_SEED, f"an integer in [0, {MAX_SEED}]"),
            ("elect_rule", self.elect_rule, self.elect_rule in ELECT_RULES, f"one of {ELECT_RULES}"),
            ("tie_rule", self.tie_rule, self.tie_rule in TIE_RULES, f"one of {TIE_RULES}"),
            ("magnitude", self.magnitude, self.magnitude in MAGNITUDES, f"one of {MAGNITUDES}"),
            ("similarity", self.similarity, self.similarity in SIMILARITIES, f"one of {SIMILARITIES}"),
            ("unified_scope", self.unified_scope, self.unified_scope in SCOPES, f"one of {SCOPES}"),
            ("fill_dropped", self.fill_dropped, self.fill_dropped in FILLS, f"one of {FILLS}"),
            ("split", self.split, self.split in ("iid", "dirichlet"), "'iid' or 'dirichlet'"),
            ("dataset", self.dataset, self.dataset in ("offline", "real"), "'offline' or 'real'"),
            (
                "device",
                self.device,
                DEVICE_PATTERN.fullmatch(self.device) is not None,
                "'cpu', 'cuda', 'cuda:<index>' or 'mps'",
            ),
            ("tasks", self.tasks, self.tasks is None or len(self.tasks) >= 1, "none (every task) or at least one task"),
            ("tasks", self.tasks, not repeated, f"distinct task names (repeated: {repeated})"),
            (
                "max_train_per_task",
                self.max_train_per_task,
                self.max_train_per_task is None or self.max_train_per_task >= 1,
                "none (no cap) or >= 1",
            ),
            ("n_clients", self.n_clients, self.n_clients >= 1, ">= 1"),
            ("tasks_per_client", self.tasks_per_client, 1 <= lo <= hi, "(lo, hi) with 1 <= lo <= hi"),
            (
                "min_clients_per_task",
                self.min_clients_per_task,
                1 <= self.min_clients_per_task <= self.n_clients,
                f"in [1, n_clients={self.n_clients}]",
            ),
            (
                "dirichlet_alpha",
                self.dirichlet_alpha,
                fin(self.dirichlet_alpha) and self.dirichlet_alpha > 0,
                "a finite number > 0",
            ),
            ("participation", self.participation, 0 < self.participation <= 1, "in (0, 1]"),
            ("rounds", self.rounds, self.rounds >= 1, ">= 1"),
            ("local_steps", self.local_steps, self.local_steps >= 1, ">= 1"),
            ("batch_size", self.batch_size, self.batch_size >= 1, ">= 1"),
            ("lr", self.lr, 0 < self.lr <= 1, "a finite number in (0, 1]"),
            (
                "weight_decay",
                self.weight_decay,
                fin(self.weight_decay) and 0 <= self.weight_decay * self.lr < 1,
                (
                    "a finite number >= 0 with lr x weight_decay < 1 (AdamW scales the weights by 1 - lr x "
                    "weight_decay "
                    f"each step; lr={self.lr})"
                ),
            ),
            ("warmup_steps", self.warmup_steps, self.warmup_steps >= 0, ">= 0"),
            ("grad_clip", self.grad_clip, fin(self.grad_clip) and self.grad_clip >= 0, "a finite number >= 0 (0: off)"),
            ("eval_every", self.eval_every, self.eval_every >= 1, ">= 1"),
            ("eval_split", self.eval_split, self.eval_split in ("val", "test"), "'val' or 'test'"),
            ("eval_batch_size", self.eval_batch_size, self.eval_batch_size >= 1, ">= 1"),
            ("sketch_bits", self.sketch_bits, 0 <= self.sketch_bits <= MAX_SKETCH_BITS, f"in [0, {MAX_SKETCH_BITS}]"),
            (
                "sketch_source",
                self.sketch_source,
                self.sketch_source in ("round", "cumulative"),
                "'round' or 'cumulative'",
            ),
            ("sketch_center", self.sketch_center, self.sketch_center in SKETCH_CENTERS, f"one of {SKETCH_CENTERS}"),
            (
                "sketch_bits",
                self.sketch_bits,
                self.similarity != "sketch" or self.sketch_bits > 0,
                "> 0 with similarity='sketch'",
            ),
            (
                "transfer_temperature",
                self.transfer_temperature,
                fin(self.transfer_temperature) and self.transfer_temperature > 0,
                "a finite number > 0",
            ),
            (
                "transfer_threshold",
                self.transfer_threshold,
                -1 <= self.transfer_threshold <= 1,
                "in [-1, 1] (a similarity)",
            ),
            ("upload_bits", self.upload_bits, self.upload_bits in CODE_BITS, f"one of {CODE_BITS}"),
            ("download_bits", self.download_bits, self.download_bits in CODE_BITS, f"one of {CODE_BITS}"),
            ("upload_topk", self.upload_topk, 0 < self.upload_topk <= 1, "in (0, 1]"),
            ("download_topk", self.download_topk, 0 < self.download_topk <= 1, "in (0, 1]"),
            ("code_block", self.code_block, self.code_block >= 1, ">= 1"),
            ("fedprox_mu", self.fedprox_mu, fin(self.fedprox_mu) and self.fedprox_mu >= 0, "a finite number >= 0"),
            ("matfl_groups", self.matfl_groups, self.matfl_groups >= 1, ">= 1"),
            (
                "merge_coefs",
                self.merge_coefs,
                self.merge_coefs is None or (len(self.merge_coefs) >= 1 and all(map(fin, self.merge_coefs))),
                "none or a non-empty tuple of finite numbers",
            ),
        ]

    def to_dict(self) -> dict:
        return asdict(self)

    def identity(self, method: str | None = None) -> dict:
        """What names a run (results folders, their hash, ``config.json``): ``to_dict`` without the fields of
        ``LATER_FIELDS`` that sit at their default. Those defaults reproduce what runs did before the fields
        existed, so results written earlier still match their config and are reused, never silently redone.
        With ``method`` other than "matu", ``MATU_ONLY_FIELDS`` are left out whatever their value."""
        return {
            k: v
            for k, v in self.to_dict().items()
            if not (k in LATER_FIELDS and v == LATER_FIELDS[k])
            and not (method is not None and method != "matu" and k in MATU_ONLY_FIELDS)
        }

    @classmethod
    def from_dict(cls, values: dict) -> RunConfig:
        values = dict(values)
        for key in ("tasks", "tasks_per_client", "merge_coefs"):
            if isinstance(values.get(key), list):
                values[key] = tuple(values[key])
        return cls(**values)


PRESETS: dict[str, RunConfig] = {
    # The tests' preset checks the machinery, not the lesson: `matu-tiny` keeps each method under a minute.
    "smoke": RunConfig(
        preset="smoke",
        model="matu-tiny",
        tasks=("mnist", "printed_digits", "textures", "stripe_orientation"),
        max_train_per_task=192,
        n_clients=4,
        tasks_per_client=(2, 2),
        min_clients_per_task=2,
        rounds=2,
        local_steps=6,
        batch_size=32,
        warmup_steps=1,
        matfl_groups=2,
        merge_coefs=(0.3, 0.6, 1.0),
    ),
    # Many clients, few samples each, every task on 4 clients, families spread: the regime where training alone
    # falls short (local ~0.56 chance-corrected normalised on seed 0, validation) and collaboration can win.
    # The workbook's presets run `matu-lite0` (docs/substrate.md): the backbone on which per-task fine-tuning
    # learns; its learning rate is chosen on validation (data/results/cpu-substrate.md).
    "cpu": RunConfig(
        preset="cpu",
        model="matu-lite0",
        lr=1e-3,
        n_clients=12,
        tasks_per_client=(4, 4),
        min_clients_per_task=3,
        max_train_per_task=240,
        local_steps=6,
        batch_size=32,
        warmup_steps=1,
        fedprox_mu=0.1,
        matfl_groups=4,  # chosen on validation: data/results/cpu-baseline-tuning.json
    ),
    "cpu-full": RunConfig(
        preset="cpu-full", model="matu-lite0", lr=1e-3, tasks=None, n_clients=12, tasks_per_client=(2, 5), rounds=6
    ),
    "gpu": RunConfig(
        preset="gpu",
        model="ViT-B-32",
        pretrained="openai",
        dataset="real",
        device="cuda",
        tasks=None,
        n_clients=15,
        tasks_per_client=(2, 5),
        rounds=10,
        local_steps=100,
        batch_size=128,
        lr=1e-5,
        weight_decay=0.1,
        warmup_steps=20,
        eval_batch_size=256,
        download=True,
    ),
}


def preset(name: str, **overrides) -> RunConfig:
    """The named preset with ``overrides`` applied; unknown preset names or override keys raise.

    ``preset`` itself is not overridable: a results file names its preset, so a smoke run labelled ``cpu``
    would report the wrong run."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset '{name}'; choose one of {sorted(PRESETS)}")
    if "preset" in overrides:
        raise ConfigError(
            f"preset cannot be overridden (got preset={overrides['preset']!r}); choose the preset "
            f"by name, one of {sorted(PRESETS)}"
        )
    from .validation import check_overrides  # typed against RunConfig: rounds=2.5 refused, tasks="mnist" -> ("mnist",)

    return replace(PRESETS[name], **check_overrides(RunConfig, overrides))


def check_runnable(cfg: RunConfig) -> None:
    """What ``RunConfig.__post_init__`` cannot decide from the values alone, checked before any data is loaded:
    the device exists on this machine, the model and a local ``pretrained`` file exist, every task is known, and
    the client partition can be built from the tasks' train sizes. Raises ``ConfigError`` (one line)."""
    import torch

    if cfg.device.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(cfg.device.split(":")[1]) if ":" in cfg.device else 0
        if index >= count:
            raise ConfigError(
                f"device={cfg.device!r} needs a CUDA GPU, and this machine has "
                f"{count or 'none'}; accepted here: 'cpu'"
                + "".join(f", 'cuda:{i}'" for i in range(count))
                + " (--set device=cpu)"
            )
    if cfg.device == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device='mps' needs Apple's Metal backend, which this machine lacks; accepted here: 'cpu'")
    from .backbones import PROJECT_MODELS, open_clip

    if cfg.model not in open_clip.list_models():
        raise ConfigError(
            f"model={cfg.model!r} is not a known model; accepted: {list(PROJECT_MODELS)} or any name of "
            f"open_clip.list_models()"
        )
    p = cfg.pretrained
    if p == "synthetic" and cfg.model in PROJECT_MODELS:
        from .backbones import BackboneUnavailable, read_manifest

        try:
            read_manifest()
        except BackboneUnavailable as err:
            raise ConfigError(f"pretrained='synthetic': {err}") from None
    if p is not None and ("/" in p or p.endswith((".safetensors", ".pt", ".pth", ".bin"))):
        if not Path(p).expanduser().is_file():
            raise ConfigError(
                f"pretrained={p!r}: no such file; accepted: an existing checkpoint file, 'synthetic' "
                f"(project models), an open_clip tag, or none (random weights)"
            )
    if cfg.dataset == "real":
        from .data import REAL_TASKS as known
    else:
        from .data import list_tasks

        known = list_tasks()
    names = list(cfg.tasks) if cfg.tasks is not None else list(known)
    bad = [t for t in names if t not in known]
    if bad:
        raise ConfigError(f"unknown tasks {bad} for dataset '{cfg.dataset}'; `python -m matu_lib list` shows them")
    _check_partition(cfg, names)


def _check_partition(cfg: RunConfig, names: list[str]) -> None:
    """Refuse a partition that cannot be built: too few tasks for ``tasks_per_client``, too few slots for
    ``min_clients_per_task`` and, for the offline suite (whose train sizes are known without loading it), too few
    train samples for every (client, task) shard to hold one."""
    lo, hi = cfg.tasks_per_client
    if hi > len(names):
        raise ConfigError(
            f"tasks_per_client must be (lo, hi) with hi <= the number of tasks ({len(names)}), "
            f"got {cfg.tasks_per_client}"
        )
    if cfg.n_clients * hi < len(names) * cfg.min_clients_per_task:
        raise ConfigError(
            f"n_clients={cfg.n_clients} x tasks_per_client max {hi} gives fewer slots than {len(names)} "
            f"tasks x min_clients_per_task {cfg.min_clients_per_task}: some task would be unheld"
        )
    if cfg.dataset != "offline":
        return
    from .data import get_task

    cap = cfg.max_train_per_task
    sizes = {t: min(get_task(t).n_train, cap) if cap is not None else get_task(t).n_train for t in names}
    if cfg.n_clients * lo > sum(min(n, cfg.n_clients) for n in sizes.values()):
        raise ConfigError(
            f"n_clients={cfg.n_clients} with tasks_per_client {cfg.tasks_per_client} needs at least "
            f"{cfg.n_clients * lo} (client, task) shards of one sample or more, and the "
            f"{len(names)} tasks' train samples ({sum(sizes.values())}) cannot fill them; "
            f"lower n_clients or tasks_per_client, or raise max_train_per_task"
        )
    small = {t: n for t, n in sizes.items() if n < cfg.min_clients_per_task}
    if small:
        raise ConfigError(
            f"min_clients_per_task={cfg.min_clients_per_task} exceeds the train samples of {small}; "
            f"accepted: at most {min(small.values())}, or raise max_train_per_task"
        )
    if cfg.split == "iid":
        try:
            partition_for(cfg, sizes)
        except ValueError as err:
            raise ConfigError(f"the client partition cannot be built: {err}") from None


LONG_RUN_FACTOR = 10  # a run asking this many times its preset's training work is announced before it starts
REFERENCE_NOTEBOOK = "00_quickstart"  # one context and one MaTU run: its committed timing stands for one run


def training_work(cfg: RunConfig) -> int:
    """Local optimiser steps a run asks for at most: rounds x clients x tasks per client (most) x local steps."""
    return cfg.rounds * cfg.n_clients * cfg.tasks_per_client[1] * cfg.local_steps


def long_run_warning(cfg: RunConfig) -> str | None:
    """One line when ``cfg`` asks for ``LONG_RUN_FACTOR`` times its preset's training work or more, with the time
    that the preset's committed timing (``data/references/<preset>.json``) scales to; None otherwise.

    A warning, not a refusal: a long run may be meant, but a typo such as ``rounds=100000000`` must not start a
    job of years without saying so first."""
    import json

    from .backbones import repo_root

    if cfg.preset not in PRESETS:
        return None
    base, seconds = PRESETS[cfg.preset], None
    path = repo_root() / "data" / "references" / f"{cfg.preset}.json"
    try:
        ref = json.loads(path.read_text())
        base = preset(cfg.preset, **((ref.get("parameters") or {}).get("OVERRIDES") or {}))
        seconds = float(ref["timings_s"][REFERENCE_NOTEBOOK])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # no usable reference: the work ratio alone is told
    ratio = training_work(cfg) / training_work(base)
    if ratio < LONG_RUN_FACTOR:
        return None
    when = (
        f"; about {_duration(seconds * ratio)} per method run, scaled from the committed {seconds:.0f} s of "
        f"{REFERENCE_NOTEBOOK} in {path.relative_to(repo_root())}"
        if seconds
        else ""
    )
    return (
        f"warning: this run asks for {ratio:,.0f}x the {cfg.preset} preset's training work "
        f"(rounds x clients x tasks per client x local steps){when}; starting anyway"
    )


def _duration(seconds: float) -> str:
    for unit, size in (("years", 365.25 * 86400), ("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:,.0f} {unit}"
    return f"{seconds:.0f} s"


def partition_for(cfg: RunConfig, sizes: dict[str, int], labels: dict | None = None):
    """The client partition ``cfg`` describes, from the train sizes alone (and labels for Dirichlet splits).

    One function for the runner and the Flower server (which derives who holds what without any data).
    """
    from .data import get_task, partition  # the data layer loads lazily: importing presets stays cheap

    families = None
    if cfg.spread_families:
        families = {t: get_task(t).family if cfg.dataset == "offline" else t for t in sizes}
    return partition(
        sizes,
        cfg.n_clients,
        cfg.tasks_per_client,
        cfg.min_clients_per_task,
        split=cfg.split,
        alpha=cfg.dirichlet_alpha,
        labels=labels if cfg.split == "dirichlet" else None,
        seed=cfg.seed,
        families=families,
    )


def study_preset(name: str, pairs: list[str], **fixed) -> RunConfig:
    """A study command's base config: preset ``name`` with ``--set`` pairs and the command's own ``fixed`` fields.

    Raises KeyError / TypeError / ValueError with a message naming the problem (unknown preset or field, bad
    value, or a field the command sets itself, such as the seed or the split)."""
    overrides = parse_overrides(pairs)
    taken = sorted(set(overrides) & ({"seed"} | set(fixed)))
    if taken:
        raise ValueError(f"--set cannot set {taken}: this command sets them with its own options")
    return preset(name, **overrides, **fixed)


def parse_overrides(pairs: list[str]) -> dict:
    """``key=value`` pairs; values are Python literals (3, 0.1, true, none, (2,4)) or plain strings. A field typed
    ``str`` takes the text as given, so an option whose value is the word "none" (``fill_dropped=none``) stays that."""
    import typing

    text_fields = {k for k, tp in typing.get_type_hints(RunConfig).items() if tp is str}
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"--set expects key=value, got '{pair}'")
        key, raw = pair.split("=", 1)
        if key in text_fields:
            out[key] = raw
            continue
        text = {"true": "True", "false": "False", "none": "None"}.get(raw.lower(), raw)
        try:
            out[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            out[key] = raw
    return out


def default_folder(preset_name: str, overrides: dict) -> Path:
    """results/<preset>, plus a readable folder per set of overrides so differently configured runs never meet."""
    folder = Path("results") / preset_name
    if overrides:
        folder /= (
            "-".join(
                f"{k}={'x'.join(map(str, v)) if isinstance(v, (tuple, list)) else v}"
                for k, v in sorted(overrides.items())
            )
            .replace(" ", "")
            .replace("/", "_")
        )
    return folder
