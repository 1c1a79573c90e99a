"""ServerApp of the echo test app.

It sends one `query` to every node, then `train-rounds` rounds of `train`
messages with a small array, and writes what came back as JSON to
`result-path`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


def _wait_for_nodes(grid: Grid, expected: int, timeout: float) -> list[int]:
    """Poll the grid until `expected` nodes are connected or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    node_ids = sorted(grid.get_node_ids())
    while len(node_ids) < expected and time.monotonic() < deadline:
        time.sleep(0.5)
        node_ids = sorted(grid.get_node_ids())
    return node_ids


def _summarise(replies: list[Message], destinations: dict[str, int]) -> dict[str, dict]:
    """Map each destination node id to its reply: node config, arrays or error.

    Replies are matched by `reply_to_message_id`, because Flower 1.42 sends
    the "node unavailable" error of a dead node from the SuperLink (node id 1)
    rather than from the node itself.
    """
    summary: dict[str, dict] = {}
    for reply in replies:
        node_id = destinations[reply.metadata.reply_to_message_id]
        entry: dict = {"src_node_id": reply.metadata.src_node_id}
        if reply.has_error():
            entry["error"] = {"code": reply.error.code, "reason": reply.error.reason}
        else:
            entry["node_config"] = dict(reply.content.config_records["node"])
            if "metrics" in reply.content.metric_records:
                entry["metrics"] = dict(reply.content.metric_records["metrics"])
            if "arrays" in reply.content.array_records:
                arrays = reply.content.array_records["arrays"]
                entry["arrays"] = {name: array.numpy().tolist() for name, array in arrays.items()}
        summary[str(node_id)] = entry
    return summary


def _send(grid: Grid, node_ids: list[int], message_type: str, content: RecordDict, *, group: str, timeout: float) -> dict:
    """Send one message to every node and summarise the replies."""
    messages = [
        Message(content, dst_node_id=node_id, message_type=message_type, group_id=group) for node_id in node_ids
    ]
    sent_at = time.monotonic()
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    seconds = time.monotonic() - sent_at
    # Pushing a message sets its message id in place.
    destinations = {message.metadata.message_id: message.metadata.dst_node_id for message in messages}
    print(f"echo_app: {message_type} {group}: {len(replies)} of {len(node_ids)} replies in {seconds:.2f} s", flush=True)
    return {"seconds": round(seconds, 3), "replies": _summarise(replies, destinations)}


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Query every node, run the train rounds and write the result file."""
    config = context.run_config
    started = time.monotonic()
    node_ids = _wait_for_nodes(grid, int(config["expected-nodes"]), float(config["nodes-timeout"]))
    print(f"echo_app: {len(node_ids)} nodes connected", flush=True)

    timeout = float(config["reply-timeout"])
    result: dict = {"node_ids": node_ids, "run_config": dict(config)}
    result["query"] = _send(grid, node_ids, "query", RecordDict(), group="query", timeout=timeout)

    arrays = ArrayRecord({"weight": Array(np.zeros((2, 2), dtype=np.float32))})
    result["train"] = []
    for round_index in range(1, int(config["train-rounds"]) + 1):
        content = RecordDict({"arrays": arrays})
        result["train"].append(_send(grid, node_ids, "train", content, group=f"round-{round_index}", timeout=timeout))
    result["seconds"] = round(time.monotonic() - started, 3)

    if config["result-path"]:
        path = Path(str(config["result-path"]))
        path.write_text(json.dumps(result, indent=2, sort_keys=True), encoding="utf-8")
        print(f"echo_app: wrote {path}", flush=True)
