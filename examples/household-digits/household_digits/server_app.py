"""ServerApp of household-digits: HomesplitStrategy with centralized evaluation."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from homesplit.privacy.settings import decode_run_config
from homesplit.strategies import HomesplitStrategy
from homesplit.strategies.privacy import DPHomesplitStrategy
from homesplit.tensorfile import save_tensors

from household_digits.task import build_model, evaluate, example_inputs, held_out_test

app = ServerApp()

logger = logging.getLogger("household_digits")


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Train for num-server-rounds rounds and write per-round results to result-path."""
    _show_homesplit_logs()
    config = context.run_config
    # Invalid privacy settings fail here, before any device is contacted.
    privacy = decode_run_config(config.get("privacy", ""))
    seed = int(config["seed"])
    torch.manual_seed(seed)
    model = build_model()
    test_images, test_labels = held_out_test(seed)
    rounds: dict[int, dict] = {}
    last = {"time": time.monotonic()}

    def centralized(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, accuracy = evaluate(model, test_images, test_labels)
        now = time.monotonic()
        rounds[server_round] = {"eval_loss": loss, "accuracy": accuracy, "seconds": now - last["time"]}
        last["time"] = now
        logger.info("homesplit round %d: eval_loss %.4f accuracy %.4f", server_round, loss, accuracy)
        return MetricRecord({"eval-loss": loss, "accuracy": accuracy})

    strategy_options = {"privacy": privacy} if privacy else {}
    strategy = (DPHomesplitStrategy if privacy else HomesplitStrategy)(
        **strategy_options,
        model_fn=build_model,
        example_inputs=example_inputs,
        fraction_train=1.0,
        fraction_evaluate=float(config["fraction-evaluate"]),
        min_available_nodes=int(config["min-available-nodes"]),
        min_household_devices=int(config["min-household-devices"]),
        max_stages=int(config["max-stages"]) or None,
        num_microbatches=int(config["num-microbatches"]),
        schedule=str(config["schedule"]),
        planner=str(config.get("planner", "balanced")),
        batch_size=int(config["batch-size"]),
        link_probe_seconds=float(config.get("link-probe-seconds", 30.0)),
        seed=seed,
    )
    train_config = ConfigRecord(
        {
            "local-epochs": int(config["local-epochs"]),
            "batch-size": int(config["batch-size"]),
            "optimizer": str(config["optimizer"]),
            "seed": seed,
            "connect-timeout": float(config["connect-timeout"]),
        }
    )
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=int(config["num-server-rounds"]),
        timeout=float(config["round-timeout"]),
        train_config=train_config,
        evaluate_config=ConfigRecord(dict(train_config)),
        evaluate_fn=centralized,
    )
    _write_results(str(config["result-path"]), result, strategy, rounds)
    if str(config["model-path"]):
        # homesplit's tensor file format, not pickle (torch.save), so reading it runs no code.
        save_tensors(str(config["model-path"]), result.arrays.to_torch_state_dict())


def _show_homesplit_logs() -> None:
    """Send INFO lines of homesplit and this app to stderr, which `flwr run --stream` shows.

    Only these two loggers: the root logger at INFO would also stream every
    HTTP request that Flower's own client logs.
    """
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    for name in ("homesplit", "household_digits"):
        named = logging.getLogger(name)
        named.setLevel(logging.INFO)
        named.addHandler(handler)
        # Importing opacus.utils.module_utils (opacus 1.6) calls logging.basicConfig,
        # which gives the root logger a stderr handler of its own; propagating
        # to it would print every line twice.
        named.propagate = False


def _write_results(path: str, result, strategy: HomesplitStrategy, rounds: dict[int, dict]) -> None:
    """Write per-round training and evaluation figures as JSON, if `path` is set."""
    if not path:
        return
    records = []
    for server_round in sorted(r for r in rounds if r > 0):
        train = dict(result.train_metrics_clientapp.get(server_round, {}))
        federated = dict(result.evaluate_metrics_clientapp.get(server_round, {}))
        households = strategy.round_records.get(server_round, {})
        records.append(
            {
                "round": server_round,
                "households_trained": households.get("households_trained", []),
                "households_failed": households.get("households_failed", {}),
                "plans": households.get("plans", {}),
                "train_loss": train.get("train-loss"),
                "eval_loss": rounds[server_round]["eval_loss"],
                "accuracy": rounds[server_round]["accuracy"],
                "federated_eval_loss": federated.get("eval-loss"),
                "federated_accuracy": federated.get("eval-accuracy"),
                "link_bytes": train.get("link-bytes", 0),
                "seconds": rounds[server_round]["seconds"],
            }
        )
        if isinstance(strategy, DPHomesplitStrategy):
            records[-1]["households_declined"] = households.get("households_declined", [])
            records[-1]["privacy"] = strategy.privacy_records.get(server_round, {})
    initial = rounds.get(0, {})
    payload = {"initial": {"eval_loss": initial.get("eval_loss"), "accuracy": initial.get("accuracy")}, "rounds": records}
    if isinstance(strategy, DPHomesplitStrategy):
        payload["stopped_after_round"] = strategy.stopped_after_round
    Path(path).write_text(json.dumps(payload, indent=2), encoding="utf-8")
