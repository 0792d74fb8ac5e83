"""Encoders: statistics and closed forms of the spike trains they produce."""

from __future__ import annotations

import math

import pytest
import torch

from snn_train.encoders import ConstantCurrentEncoder, DirectEncoder, LatencyEncoder, PoissonEncoder


def test_direct_encoder_repeats_the_scaled_image_every_step() -> None:
    images = torch.rand(3, 1, 5, 5)
    encoded = DirectEncoder(seq_length=7, input_scale=2.5)(images)
    assert encoded.shape == (7, 3, 1, 5, 5)
    for t in range(7):
        torch.testing.assert_close(encoded[t], images * 2.5)


def test_poisson_rate_is_f_max_dt_x() -> None:
    torch.manual_seed(0)
    x = torch.tensor([0.0, 0.1, 0.5, 1.0])
    encoded = PoissonEncoder(seq_length=20000, input_scale=1.0, f_max=400.0, dt=1e-3)(x)
    assert set(encoded.unique().tolist()) <= {0.0, 1.0}
    rate = encoded.mean(0)
    expected = 400.0 * 1e-3 * x
    # binomial standard error with 20000 samples is at most 0.0035: allow 4 of them
    torch.testing.assert_close(rate, expected, atol=0.014, rtol=0)


def first_spike_step(current: float, v_th: float, a: float) -> int:
    """Closed form: v_n = I(1 - (1 - a)^n) first exceeds v_th at n = floor(log(1 - v_th/I) / log(1 - a)) + 1."""
    return math.floor(math.log(1 - v_th / current) / math.log(1 - a)) + 1


@pytest.mark.parametrize("current", [1.5, 2.0, 3.7, 12.0])
def test_constant_current_first_spike_matches_closed_form(current: float) -> None:
    encoder = ConstantCurrentEncoder(
        seq_length=40, input_scale=current, tau_mem_inv=100.0, v_leak=0.0, v_th=1.0, v_reset=0.0, dt=1e-3
    )
    spikes = encoder(torch.ones(1))[:, 0]
    first = int(spikes.nonzero()[0]) + 1  # steps counted from 1
    assert first == first_spike_step(current, 1.0, 0.1)
    assert spikes[: first - 1].sum() == 0


def test_constant_current_below_rheobase_never_spikes() -> None:
    encoder = ConstantCurrentEncoder(
        seq_length=200, input_scale=0.99, tau_mem_inv=100.0, v_leak=0.0, v_th=1.0, v_reset=0.0, dt=1e-3
    )
    assert encoder(torch.ones(3)).sum() == 0


def test_latency_one_spike_per_lit_pixel_brighter_earlier() -> None:
    x = torch.tensor([[0.0, 0.01, 0.2, 0.5, 0.9, 1.0]])
    encoded = LatencyEncoder(seq_length=11, input_scale=2.0)(x)
    assert encoded.sum(0).tolist() == [[0.0, 2.0, 2.0, 2.0, 2.0, 2.0]]
    steps = encoded[:, 0, 1:].argmax(0).tolist()
    assert steps == [10, 8, 5, 1, 0]
