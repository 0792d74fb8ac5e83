"""Shared fixtures: tiny MNIST-layout IDX data sets written on the fly, and config composition."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
import torch

if "PYTEST_XDIST_WORKER_COUNT" in os.environ and "OMP_NUM_THREADS" not in os.environ:
    # Each xdist worker gets its share of torch's default threads, for its own tensors and for the processes its tests
    # start (the CLI, scripts, DDP ranks): two workers of two threads each on two cores spend their time waiting on one
    # another's preempted threads. Tests of the kernels' threading set their own thread counts.
    torch.set_num_threads(max(1, torch.get_num_threads() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    os.environ["OMP_NUM_THREADS"] = str(torch.get_num_threads())

if not torch.cuda.is_available():
    # Without a GPU, Triton's interpreter runs the Triton LIF kernels on CPU tensors (tests/test_triton.py). It must be
    # set before snn_train.triton_lif defines them; torch.compile's CPU code is not affected by it.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def write_idx(path: Path, data: torch.Tensor) -> None:
    """Write a uint8 tensor as an IDX file (magic 0x0000 08 ndim, big-endian dims, raw bytes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">BBBB", 0, 0, 0x08, data.dim()) + b"".join(struct.pack(">I", n) for n in data.shape)
    path.write_bytes(header + data.to(torch.uint8).contiguous().numpy().tobytes())


def bar_images(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """28×28 images whose class k is a bright horizontal bar at rows 2k+4..2k+5, plus noise."""
    images = torch.randint(0, 40, (len(labels), 28, 28), generator=generator, dtype=torch.uint8)
    for n, label in enumerate(labels.tolist()):
        images[n, 2 * label + 4 : 2 * label + 6, 4:24] = 255
    return images


def make_mnist(root: Path, dataset: str = "MNIST", n_train: int = 96, n_test: int = 48) -> Path:
    """A learnable MNIST-layout data set in root/<dataset>/raw; returns root."""
    generator = torch.Generator().manual_seed(0)
    raw = root / dataset / "raw"
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = torch.arange(n) % 10
        write_idx(raw / f"{prefix}-images-idx3-ubyte", bar_images(labels, generator))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels.to(torch.uint8))
    return root


@pytest.fixture
def mnist_root(tmp_path: Path) -> Path:
    return make_mnist(tmp_path / "data")


@pytest.fixture
def tiny_overrides(mnist_root: Path) -> list[str]:
    """A config small enough for a test: tiny data without a validation split (tests test after each epoch, as
    data.val_size=0 does; those of the split add one), T=4, small batches, eager kernels, no progress bar."""
    return [
        f"data.root={mnist_root}",
        "data.download=false",
        "data.val_size=0",
        "seq_length=4",
        "train.batch_size=16",
        "train.eval_batch_size=24",
        "train.device=cpu",
        "train.compile=false",
        "log.every_n_steps=1",
        "log.histogram_every_n_steps=2",
        "log.progress_bar=false",
    ]
