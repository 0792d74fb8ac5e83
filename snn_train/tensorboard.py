"""What a run shows in TensorBoard: scalars, spike statistics, voltage traces, rasters and HParams."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy
import torch
from matplotlib.figure import Figure
from omegaconf import DictConfig
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from snn_train.errors import write_error
from snn_train.model import LayerTrace
from snn_train.progress import FinalMetrics
from snn_train.schema import Config, flat_config

Method = TypeVar("Method", bound=Callable[..., Any])
HISTOGRAM_SAMPLE = 2**16  # the most values a histogram is binned from


def reported(method: Method) -> Method:
    """A failed write of the event files (disk full, permissions, any OSError) as a one-line CheckpointError.

    The writer writes in a thread of its own; its errors surface at the next call, so every writing method is wrapped.
    """

    @functools.wraps(method)
    def wrapper(self: RunLogger, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except OSError as error:
            raise write_error(f"the event files in {self.log_dir}", error) from None

    return wrapper  # type: ignore[return-value]


def flat_hparams(cfg: Config | DictConfig) -> dict[str, Any]:
    """The resolved config as flat ``a.b.c`` keys with TensorBoard-friendly values (lists and None as strings)."""
    return {
        key: str(value) if value is None or isinstance(value, list) else value
        for key, value in flat_config(cfg).items()
    }


class RunLogger:
    """Writes a run's event files into its run directory; one step axis: optimizer steps."""

    @reported
    def __init__(self, log_dir: Path, purge_step: int | None = None) -> None:
        """``purge_step``: a resumed run's first step; TensorBoard hides what an earlier session logged from
        there on."""
        self.log_dir = log_dir
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    @reported
    def flush(self) -> None:
        self.writer.flush()

    @reported
    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    @reported
    def spike_statistics(
        self, step: int, encoded: torch.Tensor, trace: dict[str, LayerTrace], histograms: bool
    ) -> None:
        """Spike rate (spikes per neuron per step) of the encoder and each LIF layer; with ``histograms``, voltage and
        spike-count histograms (binning them costs more than a training step: not at every logged step)."""
        self.writer.add_scalar("SpikeRate/encoder", encoded.float().mean().item(), step)
        for name, layer in trace.items():
            self.writer.add_scalar(f"SpikeRate/{name}", layer.spike_rate, step)
            if histograms:
                self.histogram(step, f"Voltage/{name}", layer.voltage)
                self.histogram(step, f"SpikeCount/{name}", layer.spikes.float().sum(0))  # per neuron and sample

    @reported
    def parameters(self, step: int, model: nn.Module) -> None:
        for name, parameter in model.named_parameters():
            self.histogram(step, f"Parameters/{name}", parameter.detach())
            if parameter.grad is not None:
                self.histogram(step, f"Gradients/{name}", parameter.grad)

    def histogram(self, step: int, tag: str, values: torch.Tensor) -> None:
        """The finite values only (a diverging run's voltages overflow); nothing if none are. A larger tensor is binned
        from an even sample of HISTOGRAM_SAMPLE of its values: all of conv1's voltages (millions) took longer to bin
        than a few training steps."""
        by_stride = sorted(range(values.dim()), key=lambda d: -values.stride(d))
        values = values.detach().permute(by_stride).reshape(-1)  # in memory order: a view of a dense tensor, no copy
        values = values[:: max(1, math.ceil(len(values) / HISTOGRAM_SAMPLE))]
        finite = values.float()[torch.isfinite(values)]
        if not finite.numel():
            return
        try:
            self.writer.add_histogram(tag, finite, step)
        except ValueError:  # torch's binning fails on ranges like ±1e30 (a diverging run): skip this histogram
            return

    @reported
    def readout_traces(self, step: int, voltages: torch.Tensor, label: int, sample: str) -> None:
        """Readout voltages [T, classes] of one ``sample`` (e.g. "test sample 0"), one line per class."""
        figure = Figure(figsize=(6, 3.5))
        axes = figure.subplots()
        for k, trace in enumerate(voltages.float().cpu().T):
            axes.plot(trace.numpy(), label=str(k), linewidth=2.5 if k == label else 1.0)
        axes.set(xlabel="time step", ylabel="readout voltage", title=f"readout of {sample} (label {label})")
        axes.legend(ncol=5, fontsize="small")
        figure.tight_layout()
        self.writer.add_figure("Readout/voltage_traces", figure, step)

    @reported
    def input_raster(self, step: int, encoded: torch.Tensor, sample: str) -> None:
        """Encoder output [T, ...] of one ``sample`` as an image: one row per input neuron, one column per step."""
        figure = Figure(figsize=(4, 6))
        axes = figure.subplots()
        axes.imshow(encoded.float().flatten(1).T.cpu().numpy(), aspect="auto", cmap="gray_r", interpolation="nearest")
        axes.set(xlabel="time step", ylabel="input neuron", title=f"input spikes of {sample}")
        figure.tight_layout()
        self.writer.add_figure("Input/spike_raster", figure, step)

    @reported
    def confusion_matrix(self, step: int, matrix: torch.Tensor) -> None:
        """Counts [true class, predicted class] as a heat map with the count in each cell."""
        figure = Figure(figsize=(6, 5.5))
        axes = figure.subplots()
        counts = matrix.cpu().numpy()
        image = axes.imshow(counts, cmap="Blues")
        for (true, predicted), count in numpy.ndenumerate(counts):
            axes.text(predicted, true, str(count), ha="center", va="center", fontsize="x-small")
        axes.set(
            xlabel="predicted class",
            ylabel="true class",
            title="confusion matrix",
            xticks=range(len(counts)),
            yticks=range(len(counts)),
        )
        figure.colorbar(image)
        figure.tight_layout()
        self.writer.add_figure("Eval/confusion_matrix", figure, step)

    @reported
    def spike_rasters(self, step: int, trace: dict[str, LayerTrace], labels: list[int]) -> None:
        """For each LIF layer, one raster per sample: a dot for each spike, neuron against time step."""
        for name, layer in trace.items():
            figure = Figure(figsize=(3 * len(labels), 4))
            for n, (axes, label) in enumerate(zip(figure.subplots(1, len(labels), squeeze=False)[0], labels)):
                time, neuron = layer.spikes[:, n].flatten(1).nonzero(as_tuple=True)
                axes.scatter(time.cpu().numpy(), neuron.cpu().numpy(), s=2, marker="|", color="black")
                axes.set(
                    xlabel="time step",
                    ylabel="neuron",
                    title=f"sample {n} (label {label})",
                    xlim=(-0.5, len(layer.spikes) - 0.5),
                    ylim=(-0.5, layer.spikes[0, 0].numel() - 0.5),
                )
            figure.tight_layout()
            self.writer.add_figure(f"Eval/spike_raster/{name}", figure, step)

    @reported
    def test_result(self, final: FinalMetrics) -> None:
        """The one test evaluation, at the step of the weights tested, and which weights those are."""
        step = final.test_step
        self.writer.add_scalar("Loss/test", final.test_loss, step)
        self.writer.add_scalar("Accuracy/test", final.test_accuracy, step)
        self.writer.add_scalar("Spikes/test_per_sample", final.test_spikes_per_sample, step)
        self.writer.add_text("Test/weights", f"{final.test_on} (epoch {final.test_epoch}, step {step})", step)

    @reported
    def hparams(self, cfg: Config | DictConfig, metrics: dict[str, float]) -> None:
        """One HParams entry per run, so the runs of a sweep line up in the HParams dashboard."""
        self.writer.add_hparams(flat_hparams(cfg), metrics, run_name=".")

    @reported
    def close(self) -> None:
        self.writer.close()
