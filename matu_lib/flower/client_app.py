"""The Flower ClientApp: one project ``Client`` per SuperNode, chosen by the node's ``partition-id``.

Every message carries the run config (``config.cfg``, the JSON of ``config.json``), so a node needs only the
package and its ``partition-id``: it rebuilds the same partition with ``federation.build_context(cfg)``
(deterministic from ``cfg.seed``; cached per process and config, because Ray actors and SuperNodes handle
many messages). A MaTU client's own state lives in the node's ``context.state`` between rounds, never on the
server: its latest download (``matu.download``, stored when an evaluate message delivers it at the end of the
round that produced it), its error-feedback residual (``matu.residual``), the summed updates behind
cumulative sketches (``matu.learned``) and, with ``fill_dropped``, its last trained vector per task
(``matu.kept``). A FedAvg node keeps nothing: the global vector arrives in each message (``download``:
``Payload.to_bytes()`` in an ArrayRecord, see ``strategy.payload_record``).

Message types:
- ``query``: reply ``partition.partition-id`` (the server's node map);
- ``train``: the method's client half, ``METHODS[method].client_update`` (the code the in-process runner
  calls), from the client's download; reply ``upload``;
- ``evaluate``: store a MaTU download the message carries; then, when ``config.evaluate`` is true, the accuracy
  of each of the client's tasks on its test split, reply ``acc`` (MetricRecord, task -> accuracy rounded like
  ``federation.evaluate``) and ``tasks.order``.
"""

from __future__ import annotations

import json
import os
import threading

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ..client import Client
from ..communication import Payload
from ..methods import METHODS, FedContext, IterativeMethod
from ..presets import RunConfig
from .strategy import FLOWER_METHODS, payload_record, record_payload

RESIDUAL = "matu.residual"  # context.state key of the error-feedback residual (client state)
LEARNED = "matu.learned"  # context.state key of the summed updates behind cumulative sketches (client state)
KEPT = "matu.kept"  # context.state key of the last trained vector per task, for ``fill_dropped`` (client state)
DOWNLOAD = "matu.download"  # context.state key of the client's latest MaTU download (client state)
_CONTEXTS: dict[str, FedContext] = {}
_LOCK = threading.Lock()

app = ClientApp()


def fed_context(cfg_text: str) -> FedContext:
    """``build_context`` once per process and config (data and backbone load once per Ray actor / SuperNode)."""
    with _LOCK:
        if cfg_text not in _CONTEXTS:
            if os.environ.get("MATU_TORCH_THREADS"):  # pin BLAS threads: results must not depend on the node
                torch.set_num_threads(int(os.environ["MATU_TORCH_THREADS"]))
            from ..federation import build_context

            _CONTEXTS.clear()  # one run at a time per process: do not keep old datasets alive
            _CONTEXTS[cfg_text] = build_context(RunConfig.from_dict(json.loads(cfg_text)), log=lambda *_: None)
        return _CONTEXTS[cfg_text]


def partition_id(context: Context) -> int:
    """This node's project client id: ``partition-id`` from the node config (simulation or ``--node-config``)."""
    if "partition-id" not in context.node_config:
        raise KeyError(
            "this SuperNode has no 'partition-id' in its node config; start it with "
            '--node-config "partition-id=<k> num-partitions=<n_clients>"'
        )
    return int(context.node_config["partition-id"])


def _client(msg: Message, context: Context) -> tuple[FedContext, Client, dict, type[IterativeMethod]]:
    """The run context, this node's Client (its download installed), the config and the method's class.

    A method whose clients keep their downloads (MaTU) stores one delivered in the message in the node's
    ``Context.state`` and installs the stored one; the others install the download the message carries.
    """
    conf = dict(msg.content["config"])
    ctx = fed_context(conf["cfg"])
    k = partition_id(context)
    n_parts = context.node_config.get("num-partitions")
    if n_parts is not None and int(n_parts) != ctx.cfg.n_clients:
        raise ValueError(f"node has num-partitions={n_parts} but the run has n_clients={ctx.cfg.n_clients}")
    if int(conf["client-id"]) != k:
        raise ValueError(f"message for client {conf['client-id']} reached partition {k}")
    if conf["method"] not in FLOWER_METHODS:
        raise ValueError(f"unknown method {conf['method']!r}; Flower runs {sorted(FLOWER_METHODS)}")
    method = METHODS[conf["method"]]
    client = ctx.clients[k]
    keeps = method.server_half.clients_keep_downloads
    if keeps and "download" in msg.content:  # delivered at the end of its round: the client keeps it
        context.state[DOWNLOAD] = msg.content["download"]
    if keeps:
        record = context.state[DOWNLOAD] if DOWNLOAD in context.state else None
    else:
        record = msg.content["download"] if "download" in msg.content else None
    # always overwrite: the cached Client must not keep a download from an earlier message or run
    client.download = record_payload(record, ctx.trainer.n_params)[0] if record is not None else None
    return ctx, client, conf, method


@app.query()
def query(msg: Message, context: Context) -> Message:
    return Message(RecordDict({"partition": ConfigRecord({"partition-id": partition_id(context)})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """The method's client half (``client_update``), with the client's own state restored from and saved to
    ``context.state``: MaTU's error-feedback residual and the summed updates behind cumulative sketches."""
    ctx, client, conf, method = _client(msg, context)
    c, r = ctx.cfg, int(conf["round"])
    client.residual = (
        context.state[RESIDUAL].to_torch_state_dict() if c.error_feedback and RESIDUAL in context.state else {}
    )
    cumulative = c.sketch_bits > 0 and c.sketch_source == "cumulative"
    client.learned = context.state[LEARNED].to_torch_state_dict() if cumulative and LEARNED in context.state else {}
    client.kept = _kept(context, c)
    upload = method.client_update(c, ctx.trainer, client, r, client.download)
    if client.residual:
        context.state[RESIDUAL] = ArrayRecord(torch_state_dict=client.residual)
    if client.learned:
        context.state[LEARNED] = ArrayRecord(torch_state_dict=client.learned)
    if client.kept:
        context.state[KEPT] = ArrayRecord(torch_state_dict=client.kept)
    client.download, client.residual, client.learned, client.kept = None, {}, {}, {}  # nothing outlives the message
    content = RecordDict(
        {"upload": payload_record(upload), "metrics": MetricRecord({"num-examples": sum(upload.counts.values())})}
    )
    return Message(_faulty(content, upload, client.client_id), reply_to=msg)


def _kept(context: Context, cfg: RunConfig) -> dict:
    """The client's kept vectors (``fill_dropped``) from the node's state; none when the option is off."""
    return context.state[KEPT].to_torch_state_dict() if cfg.fill_dropped != "none" and KEPT in context.state else {}


FAULT_ENV = "MATU_FAULTY_UPLOADS"  # fault injection for tests only, e.g. "0:garbage,2:claim"


def _faulty(content: RecordDict, upload: Payload, k: int) -> RecordDict:
    """What a broken or hostile node would send instead (``$MATU_FAULTY_UPLOADS``); unchanged when unset."""
    faults = dict(part.split(":", 1) for part in os.environ.get(FAULT_ENV, "").split(",") if ":" in part)
    kind = faults.get(str(k))
    if kind is None:
        return content
    blob = upload.to_bytes()
    if kind == "garbage":
        content["upload"] = payload_record(b"\x00garbage" * 7)
    elif kind == "truncated":
        content["upload"] = payload_record(blob[:-5])
    elif kind == "wrong_type":
        content["upload"] = ConfigRecord({"payload": "not an array"})
    elif kind == "missing":
        del content["upload"]
    elif kind == "claim":  # speaks for another client
        upload.client_id = (k + 1) % 1000
        content["upload"] = payload_record(upload)
    elif kind == "nan_count":
        upload.counts = {t: float("nan") for t in upload.counts}
        content["upload"] = payload_record(upload)
    return content


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Store a delivered download (``_client``); when asked, the accuracy of each task with the method's
    ``client_models`` (the vectors this client uses), rounded like ``federation.evaluate``."""
    ctx, client, conf, method = _client(msg, context)
    if not conf.get("evaluate", True):  # delivery only: the download is stored, nothing to measure
        client.download = None
        return Message(RecordDict({"tasks": ConfigRecord({"order": list(client.tasks)})}), reply_to=msg)
    client.kept = _kept(context, ctx.cfg) if ctx.cfg.fill_dropped == "model" else {}  # only a filled model reads it
    models = method.client_models(ctx.cfg, client, client.download)
    accs = {t: round(ctx.trainer.evaluate(models[t], t, ctx.test[t], ctx.cfg.eval_batch_size), 6) for t in client.tasks}
    client.download, client.kept = None, {}
    return Message(
        RecordDict({"acc": MetricRecord(accs), "tasks": ConfigRecord({"order": list(client.tasks)})}), reply_to=msg
    )
