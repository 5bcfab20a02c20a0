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

from dataclasses import asdict, dataclass, replace

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
LATER_FIELDS = {"upload_bits": 32, "upload_topk": 1.0, "download_bits": 32, "download_topk": 1.0, "code_block": 4096,
                "sketch_center": "none", "fill_dropped": "none"}
# Fields that only MaTU's clients read: another method's run is the same run whatever their value, so its identity
# leaves them out and a saved run is compared without them (choosing a MaTU option never retrains a baseline).
MATU_ONLY_FIELDS = frozenset({"sketch_center", "fill_dropped"})

# 12 tasks in 5 families (the ground truth of the similarity heatmaps): handwritten digits, animals, counting and
# position, colour, faces. Each is a task that per-task fine-tuning of `matu-lite0` learns (individual >= zero-shot
# + 0.10 on validation). Left out for that reason: the printed glyphs (zero-shot is above what 240 images fine-tune to),
# textures (zero-shot at the ceiling), shapes, arrow_direction and object_count (data/results/cpu-substrate.md,
# docs/substrate.md).
CPU_TASKS = (
    "mnist", "mnist_rotated", "sklearn_digits",
    "animals", "animals_inverted", "animals_farm",
    "dot_count", "object_position",
    "ink_colour", "colours",
    "faces", "faces_tinted",
)


@dataclass(frozen=True)
class RunConfig:
    preset: str = "custom"
    seed: int = 0
    # backbone and data
    model: str = "matu-tiny"
    pretrained: str | None = "synthetic"
    dataset: str = "offline"             # "offline" suite or "real" torchvision datasets (GPU preset)
    download: bool = False               # real datasets only: let torchvision download missing files
    tasks: tuple[str, ...] | None = CPU_TASKS  # None: every task of the suite
    max_train_per_task: int | None = None
    device: str = "cpu"
    # federation
    n_clients: int = 6
    tasks_per_client: tuple[int, int] = (2, 4)
    # A client avoids holding two tasks of one family (related tasks then meet only at the server).
    spread_families: bool = True
    min_clients_per_task: int = 1
    split: str = "iid"                   # how a shared task's samples are split: "iid" | "dirichlet"
    dirichlet_alpha: float = 0.5
    participation: float = 1.0           # fraction of clients sampled per round
    rounds: int = 5
    local_steps: int = 12                # optimiser steps per task per round
    batch_size: int = 64
    lr: float = 5e-4                     # matu-tiny's rate, chosen on validation (data/results/cpu-substrate.md)
    weight_decay: float = 0.1
    warmup_steps: int = 3
    grad_clip: float = 1.0
    eval_every: int = 1
    eval_split: str = "test"             # "val" when tuning hyper-parameters (never tune on test)
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
    sketch_bits: int = 4096              # 512 bytes per task and round, counted in the upload
    sketch_source: str = "cumulative"    # "round": this round's update; "cumulative": the client's updates so far
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
    unified_scope: str = "client"        # one unified vector per client, or one for the whole federation
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
        checks = [
            (self.elect_rule in ELECT_RULES, f"elect_rule must be one of {ELECT_RULES}"),
            (self.tie_rule in TIE_RULES, f"tie_rule must be one of {TIE_RULES}"),
            (self.magnitude in MAGNITUDES, f"magnitude must be one of {MAGNITUDES}"),
            (self.similarity in SIMILARITIES, f"similarity must be one of {SIMILARITIES}"),
            (self.unified_scope in SCOPES, f"unified_scope must be one of {SCOPES}"),
            (self.fill_dropped in FILLS, f"fill_dropped must be one of {FILLS}"),
            (self.split in ("iid", "dirichlet"), "split must be 'iid' or 'dirichlet'"),
            (self.dataset in ("offline", "real"), "dataset must be 'offline' or 'real'"),
            (self.n_clients >= 1, "n_clients must be >= 1"),
            (1 <= self.tasks_per_client[0] <= self.tasks_per_client[1], "tasks_per_client must be (lo, hi) with 1 <= lo <= hi"),
            (0 < self.participation <= 1, "participation must be in (0, 1]"),
            (self.rounds >= 1 and self.local_steps >= 1, "rounds and local_steps must be >= 1"),
            (self.batch_size >= 1 and self.lr > 0, "batch_size must be >= 1 and lr > 0"),
            (self.transfer_temperature > 0, "transfer_temperature must be > 0"),
            (self.eval_every >= 1, "eval_every must be >= 1"),
            (self.sketch_bits >= 0, "sketch_bits must be >= 0"),
            (self.sketch_source in ("round", "cumulative"), "sketch_source must be 'round' or 'cumulative'"),
            (self.sketch_center in SKETCH_CENTERS, f"sketch_center must be one of {SKETCH_CENTERS}"),
            (self.similarity != "sketch" or self.sketch_bits > 0, "similarity='sketch' needs sketch_bits > 0"),
            (self.eval_split in ("val", "test"), "eval_split must be 'val' or 'test'"),
            (self.upload_bits in CODE_BITS and self.download_bits in CODE_BITS,
             f"upload_bits and download_bits must be one of {CODE_BITS}"),
            (0 < self.upload_topk <= 1 and 0 < self.download_topk <= 1, "upload_topk and download_topk must be in (0, 1]"),
            (self.code_block >= 1, "code_block must be >= 1"),
            (self.matfl_groups >= 1, "matfl_groups must be >= 1"),
            (1 <= self.min_clients_per_task <= self.n_clients, "min_clients_per_task must be in [1, n_clients]"),
            (self.merge_coefs is None or len(self.merge_coefs) >= 1, "merge_coefs must be None or non-empty"),
            (self.tasks is None or len(self.tasks) >= 1, "tasks must be None or non-empty"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"invalid run config: {message} (got {self.to_dict()})")

    def to_dict(self) -> dict:
        return asdict(self)

    def identity(self, method: str | None = None) -> dict:
        """What names a run (results folders, their hash, ``config.json``): ``to_dict`` without the fields of
        ``LATER_FIELDS`` that sit at their default. Those defaults reproduce what runs did before the fields
        existed, so results written earlier still match their config and are reused, never silently redone.
        With ``method`` other than "matu", ``MATU_ONLY_FIELDS`` are left out whatever their value."""
        return {k: v for k, v in self.to_dict().items()
                if not (k in LATER_FIELDS and v == LATER_FIELDS[k])
                and not (method is not None and method != "matu" and k in MATU_ONLY_FIELDS)}

    @classmethod
    def from_dict(cls, values: dict) -> "RunConfig":
        values = dict(values)
        for key in ("tasks", "tasks_per_client", "merge_coefs"):
            if isinstance(values.get(key), list):
                values[key] = tuple(values[key])
        return cls(**values)


PRESETS: dict[str, RunConfig] = {
    # The tests' preset checks the machinery, not the lesson: `matu-tiny` keeps each method under a minute.
    "smoke": RunConfig(
        preset="smoke", model="matu-tiny", tasks=("mnist", "printed_digits", "textures", "stripe_orientation"), max_train_per_task=192,
        n_clients=4, tasks_per_client=(2, 2), min_clients_per_task=2, rounds=2, local_steps=6, batch_size=32,
        warmup_steps=1, matfl_groups=2, merge_coefs=(0.3, 0.6, 1.0),
    ),
    # Many clients, few samples each, every task on 4 clients, families spread: the regime where training alone
    # falls short (local ~0.56 chance-corrected normalised on seed 0, validation) and collaboration can win.
    # The workbook's presets run `matu-lite0` (docs/substrate.md): the backbone on which per-task fine-tuning
    # learns; its learning rate is chosen on validation (data/results/cpu-substrate.md).
    "cpu": RunConfig(
        preset="cpu", model="matu-lite0", lr=1e-3, n_clients=12, tasks_per_client=(4, 4), min_clients_per_task=3,
        max_train_per_task=240, local_steps=6, batch_size=32, warmup_steps=1,
        fedprox_mu=0.1, matfl_groups=4,  # chosen on validation: data/results/cpu-baseline-tuning.json
    ),
    "cpu-full": RunConfig(preset="cpu-full", model="matu-lite0", lr=1e-3, tasks=None, n_clients=12, tasks_per_client=(2, 5), rounds=6),
    "gpu": RunConfig(
        preset="gpu", model="ViT-B-32", pretrained="openai", dataset="real", device="cuda",
        tasks=None, n_clients=15, tasks_per_client=(2, 5), rounds=10, local_steps=100, batch_size=128,
        lr=1e-5, weight_decay=0.1, warmup_steps=20, eval_batch_size=256, download=True,
    ),
}


def preset(name: str, **overrides) -> RunConfig:
    """The named preset with ``overrides`` applied; unknown preset names or override keys raise."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset '{name}'; choose one of {sorted(PRESETS)}")
    from .validation import check_overrides  # typed against RunConfig: rounds=2.5 refused, tasks="mnist" -> ("mnist",)

    return replace(PRESETS[name], **check_overrides(RunConfig, overrides))
