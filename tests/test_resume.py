"""Kill a training run at chosen points, resume it each time, and get the uninterrupted run's results bit for bit."""

from __future__ import annotations

import json
import os
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
# 80 training images (16 held out for validation) in 5 batches per epoch, up to 4 epochs; validation every 2 steps and
# at each epoch end, a checkpoint every 4 steps and at each epoch end. Poisson input, random augmentation and dropout so
# the random states matter, batch norm so its running statistics must survive, and a network that learns so the
# weights move. The validation accuracy peaks at step 6, so early stopping (patience 3) ends the run mid-epoch at step
# 12, after the validations at steps 8, 10 (epoch 2's end) and 12: checkpoints at steps 4, 5, 8, 10, 12, and 12 again
# after the final test; best.pt at each better validation (steps 2, 4, 5, 6).
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
    "train.epochs=4",
    "train.checkpoint_every_n_steps=4",
    "log.histogram_every_n_steps=5",
    "data.val_size=16",
    "train.seed=1",  # the seed whose validation accuracy follows the course described above
    "log.val_every_n_steps=2",
    "train.early_stopping_patience=3",
]
COMPARED = ("epoch", "step", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_spikes_per_sample")
LOOP = ("epoch", "batch", "step", "validations", "best", "stale")  # what resuming must put back exactly
TAGS = ("Loss/train", "Accuracy/train", "LR", "SpikeRate/fc1", "Loss/val", "Accuracy/val", "Loss/test", "Accuracy/test")


def start(args: list[str], cwd: Path, kill_at: str | None = None) -> subprocess.Popen:
    command = [sys.executable, str(KILL_CHILD), kill_at, *args] if kill_at else ["snn-train", *args]
    # one thread: the validation course above (and so every kill point) must not depend on this machine's core count
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


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

    # 1. SIGKILL after step 7: the checkpoint of step 5 (epoch 1's end) is the last one; best.pt holds step 6's weights.
    code, stderr = finish(start([*overrides, f"hydra.run.dir={run_dir}"], tmp_path, "step:7"))
    assert code == -signal.SIGKILL, stderr
    assert checkpoint_step(checkpoints / "last.pt") == 5 and checkpoint_step(checkpoints / "best.pt") == 6

    # 2. SIGKILL halfway through the first file the resumed process writes: best.pt of the redone step 6. The new one
    #    is a half-written temporary file; best.pt is still the complete one of the killed session.
    code, stderr = finish(start([*overrides, f"train.resume={run_dir}"], tmp_path, "save:1"))
    assert code == -signal.SIGKILL, stderr
    assert (checkpoints / "best.pt.tmp").exists()
    assert checkpoint_step(checkpoints / "last.pt") == 5 and checkpoint_step(checkpoints / "best.pt") == 6

    # 3. SIGTERM after the resumed process's 3rd step (step 8): its validation, then a checkpoint, a clean stop.
    code, stderr = finish(start([*overrides, f"train.resume={checkpoints / 'last.pt'}"], tmp_path, "term:3"))
    assert code == 128 + signal.SIGTERM
    assert "Traceback" not in stderr and f"interrupted at step 8: saved {checkpoints / 'last.pt'}" in stderr
    loop = load_checkpoint(checkpoints / "last.pt")["loop"]
    assert (loop["step"], [v["step"] for v in loop["validations"]]) == (8, [2, 4, 5, 6, 8])
    assert (loop["best"]["step"], loop["stale"]) == (6, 1)
    assert [v["step"] for v in json.loads((run_dir / "metrics.json").read_text())["validations"]] == [2, 4, 5, 6, 8]

    # 4. SIGKILL inside the validation at epoch 2's end (step 10, the first eval-mode forward pass).
    code, stderr = finish(start([*overrides, f"train.resume={run_dir}"], tmp_path, "eval:1"))
    assert code == -signal.SIGKILL, stderr
    assert checkpoint_step(checkpoints / "last.pt") == 8

    # 5. SIGKILL inside the final test, after early stopping at step 12: the validations at steps 10 and 12 (forward
    #    passes 1 and 3), the sample figures at epoch 2's end and at the stop (2 and 4), the test set's 1st batch (5).
    code, stderr = finish(start([*overrides, f"train.resume={run_dir}"], tmp_path, "eval:5"))
    assert code == -signal.SIGKILL, stderr
    loop = load_checkpoint(checkpoints / "last.pt")["loop"]
    assert (loop["step"], loop["stale"], loop["final"]) == (12, 3, None)
    assert json.loads((run_dir / "metrics.json").read_text())["final"] is None

    # 6. Resume: nothing left to train (the patience is spent), the test set is evaluated.
    code, stderr = finish(start([*overrides, f"train.resume={run_dir}"], tmp_path))
    assert code == 0, stderr
    assert finish(reference)[0] == 0
    assert not (tmp_path / "outputs").exists()  # every resumed session wrote into the run's own folder

    for name in ("last.pt", "best.pt"):
        expected, resumed = load_checkpoint(reference_dir / "checkpoints" / name), load_checkpoint(checkpoints / name)
        assert expected["model"].keys() == resumed["model"].keys()
        assert expected["model"]["norms.0.num_batches_tracked"] == (12 if name == "last.pt" else 6)
        assert all(torch.equal(expected["model"][key], resumed["model"][key]) for key in expected["model"]), name
    expected, resumed = (
        load_checkpoint(reference_dir / "checkpoints" / "last.pt"),
        load_checkpoint(checkpoints / "last.pt"),
    )
    for expected_state, resumed_state in zip(
        expected["optimizer"]["state"].values(), resumed["optimizer"]["state"].values()
    ):
        assert all(torch.equal(expected_state[key], resumed_state[key]) for key in expected_state)
    assert {key: resumed["loop"][key] for key in LOOP} == {key: expected["loop"][key] for key in LOOP}

    expected_metrics = json.loads((reference_dir / "metrics.json").read_text())
    resumed_metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [{k: e[k] for k in COMPARED} for e in resumed_metrics["epochs"]] == [
        {k: e[k] for k in COMPARED} for e in expected_metrics["epochs"]
    ]
    assert resumed_metrics["validations"] == expected_metrics["validations"]
    timing = ("wall_s", "samples_per_s")
    assert {k: v for k, v in resumed_metrics["final"].items() if k not in timing} == {
        k: v for k, v in expected_metrics["final"].items() if k not in timing
    }
    final = resumed_metrics["final"]
    assert (final["epoch"], final["step"], final["best_step"], final["test_step"]) == (3, 12, 6, 6)
    assert "3 validations" in final["stopped_early"]

    for tag in TAGS:
        assert scalars(run_dir, tag) == scalars(reference_dir, tag), tag  # same steps, same values, nothing twice
    assert [step for step, _ in scalars(run_dir, "Loss/train")] == list(range(1, 13))
    assert [step for step, _ in scalars(run_dir, "Accuracy/val")] == [2, 4, 5, 6, 8, 10, 12]
    assert [step for step, _ in scalars(run_dir, "Accuracy/test")] == [6]


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
