"""Faults met in-process: non-finite losses, interrupts, damaged checkpoints, a changed config on resume, an
unwritable run folder."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.optim.optimizer import register_optimizer_step_post_hook

from snn_train import load_config
from snn_train.checkpoint import load_checkpoint
from snn_train.errors import CheckpointError, ConfigError, Interrupted, TrainingError
from snn_train.train import fit

# Adam's first steps move every weight by about lr: with lr=1e37 steps 1 and 2 are finite, step 3's loss is NaN.
EXPLODING = ["optim.lr=1e37", "scheduler=none", "train.checkpoint_every_n_steps=1"]


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path: Path, tiny_overrides: list[str]) -> None:
    cfg = load_config([*tiny_overrides, *EXPLODING, "train.limit_batches=4"])
    with pytest.raises(
        TrainingError, match=re.escape("loss is nan at step 3 (epoch 1, batch 3); stopped, keeping the checkpoints")
    ):
        fit(cfg, tmp_path)
    last = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert last["loop"]["step"] == 2 and load_checkpoint(tmp_path / "checkpoints" / "previous.pt")["loop"]["step"] == 1
    assert all(torch.isfinite(weights).all() for weights in last["model"].values())
    assert not (tmp_path / "metrics.json").exists()


def test_a_nan_loss_found_later_still_names_its_step_and_nothing_after_it_is_saved(
    tmp_path: Path, tiny_overrides: list[str]
) -> None:
    """The losses are checked at logging, checkpoints and the epoch's end, not every step: here only at the end."""
    rare = ["train.checkpoint_every_n_steps=100", "log.every_n_steps=100", "log.histogram_every_n_steps=100"]
    cfg = load_config([*tiny_overrides, *EXPLODING, *rare, "train.limit_batches=6"])
    with pytest.raises(TrainingError, match=re.escape("loss is nan at step 3 (epoch 1, batch 3); stopped")):
        fit(cfg, tmp_path)
    assert not list((tmp_path / "checkpoints").glob("*.pt"))
    assert not (tmp_path / "metrics.json").exists()


def test_a_nan_loss_stops_the_run_before_the_validation_after_it(tmp_path: Path, tiny_overrides: list[str]) -> None:
    rare = ["train.checkpoint_every_n_steps=100", "log.every_n_steps=100", "log.histogram_every_n_steps=100"]
    validating = ["data.val_size=16", "log.val_every_n_steps=1"]
    cfg = load_config([*tiny_overrides, *EXPLODING, *rare, *validating, "train.limit_batches=6"])
    with pytest.raises(TrainingError, match=re.escape("loss is nan at step 3 (epoch 1, batch 3); stopped")):
        fit(cfg, tmp_path)
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [scalar.step for scalar in events.Scalars("Loss/val")] == [1, 2]


def test_on_nan_skip_drops_the_updates_of_non_finite_batches_and_counts_them(
    tmp_path: Path, tiny_overrides: list[str]
) -> None:
    two_steps = fit(load_config([*tiny_overrides, *EXPLODING, "train.limit_batches=2"]), tmp_path / "two").history
    skipping = fit(
        load_config([*tiny_overrides, *EXPLODING, "train.limit_batches=4", "train.on_nan=skip"]), tmp_path / "skip"
    ).history
    events = EventAccumulator(str(tmp_path / "skip"))
    events.Reload()
    assert [(s.step, s.value) for s in events.Scalars("NaN/skipped_batches")] == [(3, 1.0), (4, 2.0)]
    after_two = load_checkpoint(tmp_path / "two" / "checkpoints" / "last.pt")["model"]
    after_four = load_checkpoint(tmp_path / "skip" / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(after_two[name], after_four[name]) for name in after_two)  # steps 3 and 4 changed nothing
    assert skipping[0].step == 4
    assert (skipping[0].train_loss, skipping[0].train_accuracy) == (
        two_steps[0].train_loss,
        two_steps[0].train_accuracy,
    )


def test_sigint_checkpoints_at_the_next_step_boundary_and_stops(tmp_path: Path, tiny_overrides: list[str]) -> None:
    steps = []

    def interrupt_at_step_2(*_: object) -> None:
        steps.append(1)
        if len(steps) == 2:
            os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)  # whatever this process started with (ignored in a background job)
    handle = register_optimizer_step_post_hook(interrupt_at_step_2)
    try:
        with pytest.raises(Interrupted, match="interrupted at step 2") as stopped:
            fit(load_config([*tiny_overrides, "train.limit_batches=4"]), tmp_path)
    finally:
        handle.remove()
    assert stopped.value.signum == signal.SIGINT and len(steps) == 2
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["loop"]["step"] == 2
    assert signal.getsignal(signal.SIGINT) is before  # the handler is put back


@pytest.fixture
def trained(tmp_path: Path, tiny_overrides: list[str]) -> Path:
    """A finished one-epoch run of two steps, checkpointed after each (previous.pt: step 1); returns its folder."""
    fit(load_config([*tiny_overrides, "train.limit_batches=2", "train.checkpoint_every_n_steps=1"]), tmp_path / "run")
    return tmp_path / "run"


def resume(overrides: list[str], run_dir: Path, *changes: str, source: Path | None = None) -> list:
    """Continue the run in ``run_dir`` from ``source`` (default: the run folder itself), as snn-train would; returns
    its epochs' metrics."""
    return fit(
        load_config([*overrides, "train.limit_batches=2", f"train.resume={source or run_dir}", *changes]), run_dir
    ).history


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda data: data[: len(data) // 2], "is not a readable checkpoint"),
        (lambda data: b"", "is not a readable checkpoint"),
        (lambda data: b"PK\x03\x04 not a zip archive" * 64, "is not a readable checkpoint"),
    ],
)
def test_a_damaged_checkpoint_is_reported_by_path_and_the_previous_one_kept(
    trained: Path, tiny_overrides: list[str], damage, reason: str
) -> None:
    last, previous = trained / "checkpoints" / "last.pt", trained / "checkpoints" / "previous.pt"
    kept = previous.read_bytes()
    last.write_bytes(damage(last.read_bytes()))
    with pytest.raises(CheckpointError, match=re.escape(f"{last} {reason}")) as error:
        resume(tiny_overrides, trained)
    assert f"train.resume={previous} continues from the one before" in str(error.value)
    assert previous.read_bytes() == kept
    assert resume(tiny_overrides, trained, source=previous)[-1].step == 2


def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path: Path, tiny_overrides: list[str]) -> None:
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(
        CheckpointError, match="other.pt is not an snn-train checkpoint .it lacks model, config, epoch, step"
    ):
        resume(tiny_overrides, tmp_path / "run", source=tmp_path / "other.pt")
    before_resume = {"model": {}, "optimizer": {}, "scheduler": None, "config": {}, "rng": {}, "epoch": 1, "step": 2}
    torch.save(before_resume, tmp_path / "old.pt")  # what snn-train wrote before it could resume
    with pytest.raises(CheckpointError, match="old.pt cannot be resumed: it lacks batch, history"):
        resume(tiny_overrides, tmp_path / "run", source=tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match=re.escape(f"no checkpoint at {tmp_path / 'nowhere'};")):
        resume(tiny_overrides, tmp_path / "run", source=tmp_path / "nowhere")


@pytest.mark.parametrize(
    "changes, differences",
    [
        (["seq_length=8"], "seq_length (4 → 8)"),
        (["model=tanh"], "model.surrogate (super → tanh)"),
        (
            ["model.conv_channels=[8,64]", "data=kmnist"],
            "data.name (mnist → kmnist); model.conv_channels ([32, 64] → [8, 64])",
        ),
        (["optim.lr=0.1"], "optim.lr (0.002 → 0.1)"),
    ],
)
def test_resuming_with_a_config_the_checkpoint_depends_on_is_refused(
    trained: Path, tiny_overrides: list[str], changes: list[str], differences: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(differences)):
        resume(tiny_overrides, trained, *changes)


def test_resuming_with_more_epochs_and_other_logging_continues_the_run(
    trained: Path, tiny_overrides: list[str]
) -> None:
    first = load_checkpoint(trained / "checkpoints" / "last.pt")
    history = resume(tiny_overrides, trained, "train.epochs=2", "log.every_n_steps=2", "train.eval_batch_size=7")
    assert [(e.epoch, e.step) for e in history] == [(1, 2), (2, 4)]
    assert history[0].test_accuracy == first["loop"]["history"][0]["test_accuracy"]
    with pytest.raises(ConfigError, match="train.epochs=1 but .* has already begun epoch 2"):
        resume(tiny_overrides, trained, "train.epochs=1")


def test_a_checkpoint_from_before_model_fc_batch_norm_resumes_as_one_without_it(
    trained: Path, tiny_overrides: list[str]
) -> None:
    file = trained / "checkpoints" / "last.pt"
    state = load_checkpoint(file)
    del state["config"]["model"]["fc_batch_norm"]  # as written before the option existed
    torch.save(state, file)
    with pytest.raises(ConfigError, match=re.escape("different config: model.fc_batch_norm (False → True)")):
        resume(tiny_overrides, trained, "train.epochs=2", "model.fc_batch_norm=true")
    history = resume(tiny_overrides, trained, "train.epochs=2")
    assert [(e.epoch, e.step) for e in history] == [(1, 2), (2, 4)]


def test_an_unwritable_run_folder_is_reported_before_anything_else(tmp_path: Path, tiny_overrides: list[str]) -> None:
    (tmp_path / "checkpoints").write_text("a file where the checkpoints folder belongs")
    cfg = load_config([*tiny_overrides, f"data.root={tmp_path / 'no data'}"])
    with pytest.raises(CheckpointError, match=re.escape(f"cannot write to the run folder {tmp_path / 'checkpoints'}")):
        fit(cfg, tmp_path)
