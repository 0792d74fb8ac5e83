"""Where a run stands: the training loop's state that a checkpoint keeps (under ``loop``), and the figures metrics.json
holds: each epoch's, each validation's and the run's final ones."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from snn_train.checkpoint import write_atomically


@dataclass
class Evaluation:
    """One evaluation of a split (a validation) of the weights at ``step``."""

    epoch: int
    step: int
    loss: float
    accuracy: float
    spikes_per_sample: float


@dataclass
class EpochMetrics:
    """One epoch's figures, as logged and written to metrics.json: the epoch-end validation's with a validation split
    (test_* None: the test set is evaluated once, at the end), the test set's without one (val_* None)."""

    epoch: int
    step: int
    train_loss: float
    train_accuracy: float
    val_loss: float | None
    val_accuracy: float | None
    val_spikes_per_sample: float | None
    test_loss: float | None
    test_accuracy: float | None
    test_spikes_per_sample: float | None
    samples_per_s: float
    wall_s: float


@dataclass
class FinalMetrics:
    """The run's result: its last epoch, its best validation (None without a validation split), why it stopped early
    (None if it did not), and the one test evaluation, of the weights ``test_on`` names (those of ``test_step``)."""

    epoch: int
    step: int
    train_loss: float
    train_accuracy: float
    samples_per_s: float
    wall_s: float
    best_val_accuracy: float | None
    best_val_loss: float | None
    best_epoch: int | None
    best_step: int | None
    stopped_early: str | None
    test_on: str
    test_epoch: int
    test_step: int
    test_loss: float
    test_accuracy: float
    test_spikes_per_sample: float


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
    validations: list[Evaluation] = field(default_factory=list)
    best: Evaluation | None = None  # the validation with the highest accuracy so far (the first of equals)
    stale: int = 0  # validations since the best one: early stopping's count
    final: FinalMetrics | None = None  # once the test set is evaluated; None again when training continues

    @classmethod
    def from_checkpoint(cls, loop: dict[str, Any]) -> Progress:
        """The progress a checkpoint's ``loop`` holds."""
        nested = ("history", "validations", "best", "final")
        names = [f.name for f in fields(cls) if f.name not in nested]
        return cls(
            **{name: loop[name] for name in names},
            history=[EpochMetrics(**e) for e in loop["history"]],
            validations=[Evaluation(**e) for e in loop["validations"]],
            best=Evaluation(**loop["best"]) if loop["best"] is not None else None,
            final=FinalMetrics(**loop["final"]) if loop["final"] is not None else None,
        )


def write_metrics(path: Path, progress: Progress) -> None:
    """metrics.json: the final figures (null until the test set is evaluated), every epoch's and every validation's,
    written atomically."""
    document = {
        "final": asdict(progress.final) if progress.final is not None else None,
        "epochs": [asdict(e) for e in progress.history],
        "validations": [asdict(v) for v in progress.validations],
    }
    text = json.dumps(document, indent=2)
    write_atomically(path, lambda f: f.write(text.encode()))
