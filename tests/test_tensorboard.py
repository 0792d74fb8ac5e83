"""What RunLogger writes, read back from the event files."""

from __future__ import annotations

from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from snn_train.tensorboard import HISTOGRAM_SAMPLE, RunLogger


def test_a_large_tensors_histogram_is_binned_from_an_even_sample_of_its_finite_values(tmp_path: Path) -> None:
    values = torch.linspace(-1.0, 3.0, 1_000_001)  # evenly spread: any even sample has their mean and range
    values[::1000] = float("nan")
    logger = RunLogger(tmp_path)
    logger.histogram(7, "Voltage/conv1", values)
    logger.histogram(7, "Voltage/small", torch.tensor([0.5, 1.5, float("inf")]))
    logger.writer.close()
    events = EventAccumulator(str(tmp_path), size_guidance={"histograms": 0})
    events.Reload()
    (large,) = events.Histograms("Voltage/conv1")
    (small,) = events.Histograms("Voltage/small")
    assert large.step == 7 and HISTOGRAM_SAMPLE / 2 < large.histogram_value.num <= HISTOGRAM_SAMPLE
    assert abs(large.histogram_value.sum / large.histogram_value.num - 1.0) < 1e-3
    assert large.histogram_value.min < -0.99 and large.histogram_value.max > 2.99
    assert (small.histogram_value.num, small.histogram_value.sum) == (2, 2.0)
