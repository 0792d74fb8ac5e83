"""The one evaluation of a network on a split, used by training's epoch ends and by ``snn-eval``: the confusion
matrix, loss, spikes and synaptic operations summed over the split, and a traced forward pass of a few samples."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from snn_train import distributed
from snn_train.data import Split, batch_indices
from snn_train.model import ConvSNN, LayerTrace
from snn_train.task import autocast, decode, encoded_shard


def confusion_matrix(labels: torch.Tensor, predictions: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Counts [num_classes, num_classes]: row = true class, column = predicted class."""
    counts = torch.bincount(labels * num_classes + predictions, minlength=num_classes**2)
    return counts.reshape(num_classes, num_classes)


def per_class_accuracy(matrix: torch.Tensor) -> list[float | None]:
    """Recall of each class (correct / samples of that class); None for a class with no samples."""
    totals = matrix.sum(1)
    return [None if total == 0 else (matrix[k, k] / total).item() for k, total in enumerate(totals)]


@dataclass
class TestCounts:
    """Sums over a split: the confusion matrix, the loss, and each LIF layer's spikes and synaptic operations."""

    confusion: torch.Tensor  # [classes, classes], int64
    loss_sum: float  # cross-entropy of the decoded logits (without label smoothing)
    spikes: dict[str, float]
    operations: dict[str, float]
    neurons: dict[str, int]  # per sample and time step

    @property
    def samples(self) -> int:
        return int(self.confusion.sum())

    @property
    def accuracy(self) -> float:
        return self.confusion.trace().item() / self.samples

    @property
    def loss(self) -> float:
        return self.loss_sum / self.samples

    @property
    def spikes_per_sample(self) -> float:
        """All LIF layers' spikes over the T steps, per sample."""
        return sum(self.spikes.values()) / self.samples


@contextmanager
def random_states_kept(device: torch.device, seed: int | None = None) -> Iterator[None]:
    """The random draws inside (an encoder's noise) leave torch's random states as they were, so training continues
    the same however often it evaluates; with ``seed``, they are drawn from torch seeded with it."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if seed is not None:
            torch.manual_seed(seed)
        yield


@torch.no_grad()
def evaluate(
    model: ConvSNN,
    encoder: nn.Module,
    split: Split,
    decoder: str,
    batch_size: int,
    limit: int | None,
    precision: str,
    seed: int,
) -> TestCounts:
    """Run the split (or its first ``limit`` batches) through the network in eval mode, every layer's spikes counted
    and its events traced (``keep_spikes=False``: one kernel run per layer), each rank taking its share of each batch;
    the counts are summed over the ranks.

    The encoder's noise is drawn from torch seeded with ``seed`` (train.seed), aside from the random states: the
    figures depend on the weights alone (every validation sees the same input, snn-eval the training run's), and
    training continues the same however often it evaluates.
    """
    training, layers = model.training, model.lif_layer_names()
    model.eval()
    num_classes = model.readout_linear.out_features
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=split.labels.device)
    sums = torch.zeros(1 + 2 * len(layers), dtype=torch.float64, device=split.labels.device)  # loss, spikes, synops
    neurons: dict[str, int] = {}
    with random_states_kept(split.labels.device, seed):
        for index in batch_indices(len(split), batch_size, None, limit):
            encoded, labels = encoded_shard(encoder, split, index)
            trace: dict[str, LayerTrace] = {}
            with autocast(labels.device, precision):
                logits = decode(model(encoded, trace, record_voltage=False, keep_spikes=False), decoder)
            confusion += confusion_matrix(labels, logits.argmax(1), num_classes)
            sums[0] += F.cross_entropy(logits.float(), labels, reduction="sum")
            operations = model.synaptic_operations(trace)
            for n, name in enumerate(layers):
                sums[1 + n] += trace[name].spike_count
                sums[1 + len(layers) + n] += operations[name].sum(dtype=torch.float64)
                neurons[name] = trace[name].neurons
    model.train(training)
    distributed.sum_over_ranks(confusion)
    loss_sum, *per_layer = distributed.sum_over_ranks(sums).tolist()
    spikes, operations = per_layer[: len(layers)], per_layer[len(layers) :]
    return TestCounts(confusion, loss_sum, dict(zip(layers, spikes)), dict(zip(layers, operations)), neurons)


@torch.no_grad()
def sample_forward(
    model: ConvSNN, encoder: nn.Module, split: Split, samples: int
) -> tuple[torch.Tensor, torch.Tensor, dict[str, LayerTrace]]:
    """The encoded input [T, n, ...], readout voltages [T, n, classes] and layer traces of the split's first
    ``samples`` samples in eval mode, for figures.

    Their input is drawn aside from the random states: only rank 0 draws it, and every rank's states must stay equal.
    """
    training = model.training
    with random_states_kept(split.labels.device):
        model.eval()
        encoded = encoder(split.encoder_input(slice(samples)))
        trace: dict[str, LayerTrace] = {}
        voltages = model(encoded, trace)
        model.train(training)
    return encoded, voltages, trace
