"""Kill a training run at chosen points, resume it each time, and get the uninterrupted run's results bit for bit."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from snn_train.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow  # each test starts snn-train (or a script) as a process

KILL_CHILD = Path(__file__).with_name("kill_child.py")
# 3 epochs of 6 batches, a checkpoint every 4 steps and at each epoch end (steps 4, 6, 8, 12, 16, 18);
# Poisson input, random augmentation and dropout so the random states matter, batch norm so its running statistics
# must survive, and a network that learns so the weights move.
RUN = [
    "encoder=poisson",
    "model.lif.alpha=10",
    "encoder.input_scale=5",
    "seq_length=4",
    "decoder=mean",
    "optim.lr=5e-3",
    "augment.shift=1",
    "augment.rotate=5",
    "model.dropout=0.1",
    "model.batch_norm=true",
    "train.epochs=3",
    "train.checkpoint_every_n_steps=4",
    "log.histogram_every_n_steps=5",
]
COMPARED = ("epoch", "step", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "test_spikes_per_sample")


def start(args: list[str], cwd: Path, kill_at: str | None = None) -> subprocess.Popen:
    command = [sys.executable, str(KILL_CHILD), kill_at, *args] if kill_at else ["snn-train", *args]
    return subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> tuple[int, str]:
    _, stderr = process.communicate(timeout=300)
    return process.returncode, stderr


def checkpoint_step(path: Path) -> int:
    return load_checkpoint(path)["loop"]["step"]


def scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return [(s.step, s.value) for s in events.Scalars(tag)]


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")],
        ),
    ],
)
def test_killed_and_resumed_run_ends_exactly_like_an_uninterrupted_one(
    tmp_path: Path, tiny_overrides: list[str], device: str
) -> None:
    overrides = [*(o for o in tiny_overrides if not o.startswith("train.device=")), *RUN, f"train.device={device}"]
    reference_dir, run_dir = tmp_path / "reference", tmp_path / "run"
    reference = start([*overrides, f"hydra.run.dir={reference_dir}"], tmp_path)
    checkpoints = run_dir / "checkpoints"

    # 1. SIGKILL mid-epoch 1, after step 5: the checkpoint of step 4 is the last one.
    code, stderr = finish(start([*overrides, f"hydra.run.dir={run_dir}"], tmp_path, "step:5"))
    assert code == -signal.SIGKILL, stderr
    assert checkpoint_step(checkpoints / "last.pt") == 4

    # 2. SIGTERM after the resumed process's 3rd step (step 7, epoch 2): a checkpoint there, a clean stop.
    code, stderr = finish(start([*overrides, f"train.resume={run_dir}"], tmp_path, "term:3"))
    assert code == 128 + signal.SIGTERM
    assert "Traceback" not in stderr and f"interrupted at step 7: saved {checkpoints / 'last.pt'}" in stderr
    assert checkpoint_step(checkpoints / "last.pt") == 7
    assert [e["epoch"] for e in json.loads((run_dir / "metrics.json").read_text())["epochs"]] == [1]

    # 3. SIGKILL halfway through the 2nd checkpoint write (epoch 2's end, after step 8's): the new one is a
    #    half-written temporary file, last.pt is still step 8's; epoch 2's test scalars are logged.
    code, stderr = finish(start([*overrides, f"train.resume={checkpoints / 'last.pt'}"], tmp_path, "save:2"))
    assert code == -signal.SIGKILL, stderr
    assert (checkpoints / "last.pt.tmp").exists()
    assert checkpoint_step(checkpoints / "last.pt") == 8 and checkpoint_step(checkpoints / "previous.pt") == 7

    # 4. SIGKILL inside epoch 3's evaluation (the 4th eval-mode forward pass: epoch 2's evaluation took 3).
    code, stderr = finish(start([*overrides, f"train.resume={run_dir}"], tmp_path, "eval:4"))
    assert code == -signal.SIGKILL, stderr
    assert checkpoint_step(checkpoints / "last.pt") == 16

    # 5. Resume to the end.
    code, stderr = finish(start([*overrides, f"train.resume={run_dir}"], tmp_path))
    assert code == 0, stderr
    assert finish(reference)[0] == 0
    assert not (tmp_path / "outputs").exists()  # every resumed session wrote into the run's own folder

    expected, resumed = (
        load_checkpoint(reference_dir / "checkpoints" / "last.pt"),
        load_checkpoint(checkpoints / "last.pt"),
    )
    assert expected["model"].keys() == resumed["model"].keys()
    assert expected["model"]["norms.0.num_batches_tracked"] == 18  # the running statistics are compared below
    assert all(torch.equal(expected["model"][name], resumed["model"][name]) for name in expected["model"])
    for expected_state, resumed_state in zip(
        expected["optimizer"]["state"].values(), resumed["optimizer"]["state"].values()
    ):
        assert all(torch.equal(expected_state[key], resumed_state[key]) for key in expected_state)

    expected_epochs = json.loads((reference_dir / "metrics.json").read_text())["epochs"]
    resumed_epochs = json.loads((run_dir / "metrics.json").read_text())["epochs"]
    assert [{k: e[k] for k in COMPARED} for e in resumed_epochs] == [
        {k: e[k] for k in COMPARED} for e in expected_epochs
    ]
    assert len(resumed_epochs) == 3

    for tag in ("Loss/train", "Accuracy/train", "LR", "SpikeRate/fc1", "Loss/test"):
        assert scalars(run_dir, tag) == scalars(reference_dir, tag), tag  # same steps, same values, nothing twice
    assert [step for step, _ in scalars(run_dir, "Loss/train")] == list(range(1, 19))


def test_a_checkpoint_write_that_fails_stops_the_run_in_one_line_and_keeps_the_last_checkpoint(
    tmp_path: Path, tiny_overrides: list[str]
) -> None:
    # A checkpoint after every step; the 3rd write (step 3's, at the epoch's end) fails halfway with ENOSPC.
    run_dir, checkpoints = tmp_path / "run", tmp_path / "run" / "checkpoints"
    overrides = [
        *tiny_overrides,
        "train.limit_batches=3",
        "train.checkpoint_every_n_steps=1",
        f"hydra.run.dir={run_dir}",
    ]
    code, stderr = finish(start(overrides, tmp_path, "full:3"))
    assert code == 2
    assert stderr == f"snn-train: error: cannot write {checkpoints / 'last.pt'} (No space left on device)\n"
    assert checkpoint_step(checkpoints / "last.pt") == 2 and checkpoint_step(checkpoints / "previous.pt") == 1
    assert sorted(path.name for path in checkpoints.iterdir()) == ["last.pt", "previous.pt"]  # no temporary file
    assert not (run_dir / "metrics.json").exists()
