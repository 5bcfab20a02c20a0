"""The Flower ClientApp: one project ``Client`` per SuperNode, chosen by the node's ``partition-id``.

Every message carries the run config (``config.cfg``, the JSON of ``config.json``), so a node needs only the
package and its ``partition-id``: it rebuilds the same partition with ``federation.build_context(cfg)``
(deterministic from ``cfg.seed``; cached per process and config, because Ray actors and SuperNodes handle
many messages). A MaTU client's own state lives in the node's ``context.state`` between rounds, never on the
server: its latest download (``matu.download``, stored when an evaluate message delivers it at the end of the
round that produced it), its error-feedback residual (``matu.residual``) and the summed updates behind
cumulative sketches (``matu.learned``). A FedAvg node keeps nothing: the global vector arrives in each
message (``download``: ``Payload.to_bytes()`` in an ArrayRecord, see ``strategy.payload_record``).

Message types:
- ``query``: reply ``partition.partition-id`` (the server's node map);
- ``train``: MaTU: ``Client.matu_round`` from the download with seed ``derive_seed(cfg.seed, round)``;
  FedAvg: ``LocalTrainer.train_multitask`` from the global vector with ``derive_seed(cfg.seed, round, k)``;
  reply ``upload``;
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

from ..client import Client, matu_options
from ..communication import Payload
from ..methods import FedContext
from ..presets import RunConfig
from ..training import derive_seed
from .strategy import payload_record, record_payload

RESIDUAL = "matu.residual"  # context.state key of the error-feedback residual (client state)
LEARNED = "matu.learned"    # context.state key of the summed updates behind cumulative sketches (client state)
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
        raise KeyError("this SuperNode has no 'partition-id' in its node config; start it with "
                       "--node-config \"partition-id=<k> num-partitions=<n_clients>\"")
    return int(context.node_config["partition-id"])


def _client(msg: Message, context: Context) -> tuple[FedContext, Client, dict]:
    """The run context, this node's Client (with the download from the message installed) and the config."""
    conf = dict(msg.content["config"])
    ctx = fed_context(conf["cfg"])
    k = partition_id(context)
    n_parts = context.node_config.get("num-partitions")
    if n_parts is not None and int(n_parts) != ctx.cfg.n_clients:
        raise ValueError(f"node has num-partitions={n_parts} but the run has n_clients={ctx.cfg.n_clients}")
    if int(conf["client-id"]) != k:
        raise ValueError(f"message for client {conf['client-id']} reached partition {k}")
    client = ctx.clients[k]
    if conf["method"] == "matu" and "download" in msg.content:  # delivered at the end of its round: keep it
        context.state[DOWNLOAD] = msg.content["download"]
    record = context.state[DOWNLOAD] if conf["method"] == "matu" and DOWNLOAD in context.state else (
        msg.content["download"] if "download" in msg.content else None)
    # always overwrite: the cached Client must not keep a download from an earlier message or run
    client.download = record_payload(record)[0] if record is not None else None
    return ctx, client, conf


@app.query()
def query(msg: Message, context: Context) -> Message:
    return Message(RecordDict({"partition": ConfigRecord({"partition-id": partition_id(context)})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    ctx, client, conf = _client(msg, context)
    c, r = ctx.cfg, int(conf["round"])
    if conf["method"] == "matu":
        has_residual = c.error_feedback and RESIDUAL in context.state
        client.residual = context.state[RESIDUAL].to_torch_state_dict() if has_residual else {}
        cumulative = c.sketch_bits > 0 and c.sketch_source == "cumulative"
        client.learned = context.state[LEARNED].to_torch_state_dict() if cumulative and LEARNED in context.state else {}
        upload = client.matu_round(ctx.trainer, c.local_steps, derive_seed(c.seed, r), **matu_options(c))
        if c.error_feedback:
            context.state[RESIDUAL] = ArrayRecord(torch_state_dict=client.residual)
        if cumulative:
            context.state[LEARNED] = ArrayRecord(torch_state_dict=client.learned)
        client.residual, client.learned = {}, {}
    elif conf["method"] == "fedavg":
        start = client.download.vectors["model"] if client.download is not None else torch.zeros(ctx.trainer.n_params)
        delta = ctx.trainer.train_multitask(start, client.data, c.local_steps, derive_seed(c.seed, r, client.client_id))
        upload = Payload(client.client_id, client.tasks, {"model": delta},
                         counts={t: client.count(t) for t in client.tasks})
    else:
        raise ValueError(f"unknown method {conf['method']!r}")
    client.download = None  # nothing outlives the message (see module docstring)
    content = RecordDict({"upload": payload_record(upload),
                          "metrics": MetricRecord({"num-examples": sum(upload.counts.values())})})
    return Message(_faulty(content, upload, client.client_id), reply_to=msg)


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
    ctx, client, conf = _client(msg, context)
    if not conf.get("evaluate", True):  # delivery only: the download is stored, nothing to measure
        client.download = None
        return Message(RecordDict({"tasks": ConfigRecord({"order": list(client.tasks)})}), reply_to=msg)
    accs = {}
    for t in client.tasks:
        if conf["method"] == "fedavg":
            delta = client.download.vectors["model"] if client.download is not None else None
        else:
            delta = client.modulated(t)
        accs[t] = round(ctx.trainer.evaluate(delta, t, ctx.test[t], ctx.cfg.eval_batch_size), 6)
    client.download = None
    return Message(RecordDict({"acc": MetricRecord(accs), "tasks": ConfigRecord({"order": list(client.tasks)})}),
                   reply_to=msg)
