"""ClientApp of the echo test app.

Every reply carries the node's node config, so a test can check which
SuperNode replied with which `--node-config`.
"""

from __future__ import annotations

import os
import time

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


def _node_record(context: Context) -> ConfigRecord:
    """Collect the node config and the ClientApp's process id."""
    record = ConfigRecord(dict(context.node_config))
    record["pid"] = os.getpid()
    return record


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Reply with the node config."""
    return Message(RecordDict({"node": _node_record(context)}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Reply with the received array plus one, after an optional sleep."""
    time.sleep(float(context.run_config["train-sleep"]))

    received = msg.content.array_records["arrays"]
    echoed = {name: np.asarray(array.numpy()) + 1.0 for name, array in received.items()}

    # Context.state persists per node across the messages of one run, in
    # deployment and in simulation, so it counts the train rounds a node saw.
    counter = context.state.config_records.get("counter", ConfigRecord({"train-calls": 0}))
    counter["train-calls"] = int(counter["train-calls"]) + 1
    context.state.config_records["counter"] = counter

    content = RecordDict(
        {
            "arrays": ArrayRecord({name: Array(array) for name, array in echoed.items()}),
            "metrics": MetricRecord({"num-examples": 1, "train-calls": counter["train-calls"]}),
            "node": _node_record(context),
        }
    )
    return Message(content, reply_to=msg)
