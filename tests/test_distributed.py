"""Data-parallel training on CPU (gloo): both ranks end with the same weights, and with those of one process training
on the same global batches; under torchrun the CLI writes one run folder, from rank 0."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from snn_train.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow  # each test starts snn-train (or a script) as a process

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
RANKS = Path(__file__).with_name("ddp_ranks.py")
# Global batches of 15 samples, 3 per epoch: the ranks' shares are 8 and 7, so unequal shares must be weighted right;
# Poisson input, so both ranks must draw the single process's noise; 2 epochs, so the reshuffle counts.
# SGD, as Adam divides by the root of the squared gradients, which blows the rounding in near-zero gradients up to
# steps of lr; a low threshold, so that every layer spikes and SGD's weights move; few steps, as the rounding flips a
# spike now and then, and the runs then drift apart; a constant learning rate, so that a 1-epoch run resumed for a
# 2nd epoch is a 2-epoch run. 15 of the training images held out for validation after every 2nd step and each epoch:
# one batch of 24 split 8 and 7, so the validation's shares are unequal too.
RUN = [
    "encoder=poisson",
    "encoder.input_scale=5",
    "model.lif.v_th=0.1",
    "decoder=mean",
    "optim=sgd",
    "optim.lr=0.5",
    "scheduler=none",
    "train.batch_size=15",
    "train.limit_batches=3",
    "data.val_size=15",
    "log.val_every_n_steps=2",
]
COMPARED = ("train_loss", "train_accuracy", "val_loss", "val_accuracy")  # of each epoch


def launch(command: list[str], cwd: Path) -> None:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def assert_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


def checkpoint(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]


def metrics(run_dir: Path) -> dict[str, float]:
    """Each epoch's train and validation figures, each validation's, and the final test's, by name."""
    document = json.loads((run_dir / "metrics.json").read_text())
    figures = {f"epoch {e['epoch']} {key}": e[key] for e in document["epochs"] for key in COMPARED}
    figures |= {f"step {v['step']} {key}": v[key] for v in document["validations"] for key in ("loss", "accuracy")}
    return figures | {key: document["final"][key] for key in ("test_loss", "test_accuracy", "test_step")}


def assert_same_figures(actual: dict[str, float], expected: dict[str, float]) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        assert abs(actual[key] - expected[key]) < 1e-3, key  # a flipped spike in an evaluation moves a loss by 1e-4


@pytest.mark.parametrize(
    "device",
    [
        "cpu",  # gloo
        pytest.param(  # nccl
            "cuda",
            marks=[pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")],
        ),
    ],
)
def test_two_ranks_end_identical_and_like_one_process_on_the_same_global_batches(
    tmp_path: Path, tiny_overrides: list[str], device: str
) -> None:
    on_device = [*(o for o in tiny_overrides if not o.startswith("train.device=")), f"train.device={device}"]
    overrides = [*on_device, *RUN, "train.epochs=2"]
    launch([*TORCHRUN, str(RANKS), str(tmp_path / "ddp"), *overrides], tmp_path)
    launch([sys.executable, str(RANKS), str(tmp_path / "single"), *overrides], tmp_path)
    rank0, rank1 = (torch.load(tmp_path / "ddp" / f"rank{r}.pt") for r in (0, 1))
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    assert_close(rank0, torch.load(tmp_path / "single" / "rank0.pt"))
    assert_same_figures(metrics(tmp_path / "ddp" / "run"), metrics(tmp_path / "single" / "run"))


def test_torchrun_cli_writes_one_run_folder_from_rank_0_and_resumes_a_one_process_run(
    tmp_path: Path, tiny_overrides: list[str]
) -> None:
    overrides, resumed_dir = [*tiny_overrides, *RUN], tmp_path / "resumed"
    launch([*TORCHRUN, "-m", "snn_train", *overrides, "train.epochs=2"], tmp_path)
    (ddp_dir,) = (tmp_path / "outputs").glob("*/*")  # the ranks agreed on rank 0's folder name
    assert sorted(path.name for path in (ddp_dir / ".hydra").iterdir()) == [
        "config.yaml",
        "hydra.yaml",
        "overrides.yaml",
    ]
    assert sorted(path.name for path in (ddp_dir / "checkpoints").iterdir()) == ["best.pt", "last.pt", "previous.pt"]
    assert (ddp_dir / "cli.log").read_text().count("train loss") == 2  # rank 0 alone logs its epochs
    assert len({path.name.split(".")[-2] for path in ddp_dir.glob("events.out.tfevents.*")}) == 1  # from one process id

    # Epoch 1 in one process, epoch 2 in two: the same run.
    launch([sys.executable, "-m", "snn_train", *overrides, "train.epochs=1", f"hydra.run.dir={resumed_dir}"], tmp_path)
    launch([*TORCHRUN, "-m", "snn_train", *overrides, "train.epochs=2", f"train.resume={resumed_dir}"], tmp_path)
    assert len(list((tmp_path / "outputs").glob("*/*"))) == 1  # it continued in its own folder
    assert_close(checkpoint(ddp_dir), checkpoint(resumed_dir))
    assert_same_figures(metrics(resumed_dir), metrics(ddp_dir))
