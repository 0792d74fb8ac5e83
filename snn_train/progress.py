"""Where a run stands: the training loop's state that a checkpoint keeps (under ``loop``), and each epoch's
metrics as metrics.json holds them."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from snn_train.checkpoint import write_atomically


@dataclass
class EpochMetrics:
    """One epoch's figures, as logged and written to metrics.json."""

    epoch: int
    step: int
    train_loss: float
    train_accuracy: float
    test_loss: float
    test_accuracy: float
    test_spikes_per_sample: float
    samples_per_s: float
    wall_s: float


@dataclass
class Progress:
    """Where a run stands: what a checkpoint holds beyond the states, to continue the loop exactly."""

    epoch: int = 0  # the epoch of the last step (0 before the first); finished once ``history`` has it
    batch: int = 0  # batches of it done
    step: int = 0  # batches of the run done, skipped ones included: the step axis
    loss_sum: float = 0.0  # this epoch's train loss summed over samples, correct predictions, samples
    correct: int = 0
    seen: int = 0
    skipped: int = 0  # batches skipped for a non-finite loss (train.on_nan=skip), whole run
    wall_s: float = 0.0  # run time and this epoch's time so far
    epoch_s: float = 0.0
    history: list[EpochMetrics] = field(default_factory=list)

    @classmethod
    def from_checkpoint(cls, loop: dict[str, Any]) -> Progress:
        """The progress a checkpoint's ``loop`` holds."""
        names = [f.name for f in fields(cls) if f.name != "history"]
        return cls(**{name: loop[name] for name in names}, history=[EpochMetrics(**e) for e in loop["history"]])


def write_metrics(path: Path, epochs: list[EpochMetrics]) -> None:
    """metrics.json: the final epoch's figures and every epoch's, written atomically."""
    text = json.dumps({"final": asdict(epochs[-1]), "epochs": [asdict(e) for e in epochs]}, indent=2)
    write_atomically(path, lambda f: f.write(text.encode()))
