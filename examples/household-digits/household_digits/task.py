"""Model, data and evaluation of the household-digits app.

The data is scikit-learn's handwritten digits (1,797 8x8 images, shipped with
scikit-learn, no download). A fixed 20% is held out for the server's
centralized evaluation. A flwr-datasets partitioner splits the rest across
households, IID or Dirichlet over the labels.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from homesplit.clients import DeviceConfig, DeviceData

HELD_OUT_FRACTION = 0.2
LOCAL_TEST_FRACTION = 0.1


def build_model(channels: int = 16, classes: int = 10) -> nn.Sequential:
    """Build the CNN: three conv blocks with GroupNorm (split-safe, unlike BatchNorm) and an MLP head."""
    groups = 4
    return nn.Sequential(
        nn.Conv2d(1, channels, 3, padding=1),
        nn.GroupNorm(groups, channels),
        nn.ReLU(),
        nn.Conv2d(channels, 2 * channels, 3, padding=1),
        nn.GroupNorm(groups, 2 * channels),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(2 * channels, 2 * channels, 3, padding=1),
        nn.GroupNorm(groups, 2 * channels),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * channels * 2 * 2, 64),
        nn.ReLU(),
        nn.Linear(64, classes),
    )


def example_inputs() -> tuple[torch.Tensor]:
    """Return one example input: a batch of one 1x8x8 image."""
    return (torch.zeros(1, 1, 8, 8),)


def _split(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    # Imported here: every message runs in a new process, and only the data
    # owner and the server need scikit-learn and the datasets libraries.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    images, labels = load_digits(return_X_y=True)
    images = (images / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    return train_test_split(images, labels, test_size=HELD_OUT_FRACTION, random_state=seed, stratify=labels)


def held_out_test(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the held-out test images and labels for centralized evaluation."""
    _, test_x, _, test_y = _split(seed)
    return torch.from_numpy(test_x), torch.from_numpy(test_y).long()


def _partitioner(run_config: Mapping[str, Any], num_partitions: int):
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    kind = str(run_config.get("partitioner", "iid"))
    seed = int(run_config.get("seed", 0))
    if kind == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    if kind == "dirichlet":
        return DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=float(run_config.get("dirichlet-alpha", 0.5)),
            min_partition_size=20,
            self_balancing=True,
            seed=seed,
        )
    raise ValueError(f"run config partitioner={kind!r} is unknown; use 'iid' or 'dirichlet'")


def household_partition(partition_id: int, num_partitions: int, run_config: Mapping[str, Any]) -> DeviceData:
    """Return one household's training examples and local test examples."""
    seed = int(run_config.get("seed", 0))
    from datasets import Dataset

    train_x, _, train_y, _ = _split(seed)
    partitioner = _partitioner(run_config, num_partitions)
    partitioner.dataset = Dataset.from_dict({"image": train_x.reshape(len(train_x), -1), "label": train_y})
    part = partitioner.load_partition(partition_id).with_format("numpy")
    images = torch.from_numpy(np.asarray(part["image"], dtype=np.float32).reshape(-1, 1, 8, 8))
    labels = torch.from_numpy(np.asarray(part["label"])).long()
    cut = max(1, int(len(labels) * LOCAL_TEST_FRACTION))
    return DeviceData(train=(images[cut:], labels[cut:]), test=(images[:cut], labels[:cut]))


def load_data(device: DeviceConfig) -> DeviceData:
    """Load the data owner's partition, chosen by its partition-id and num-partitions."""
    if device.partition_id is None or device.num_partitions is None:
        raise ValueError(
            f"{device.household}/{device.device} has holds-data=true but partition-id or num-partitions is missing in its node config; add both"
        )
    return household_partition(device.partition_id, device.num_partitions, device.run_config)


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Return (mean cross-entropy, accuracy) of `model` on the given examples."""
    model.eval()
    with torch.no_grad():
        logits = model(images)
        loss = float(nn.functional.cross_entropy(logits, labels))
        accuracy = float((logits.argmax(dim=1) == labels).float().mean())
    return loss, accuracy
