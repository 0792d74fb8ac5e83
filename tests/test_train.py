"""The training loop in-process: it learns, it is reproducible, and the Hydra main returns the accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from snn_train import ConvSNN, LIFParameters, LIParameters, load_config
from snn_train.cli import run
from snn_train.train import fit


def train_losses(run_dir: Path) -> list[float]:
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return [scalar.value for scalar in events.Scalars("Loss/train")]


# A silent network's max-over-time readout picks step 0, which no input can reach yet: mean learns from the start.
LEARNING = ["model.lif.alpha=10", "encoder.input_scale=5", "seq_length=8", "decoder=mean", "optim.lr=5e-3"]


def test_same_seed_and_config_give_the_same_losses_step_for_step(tmp_path: Path, tiny_overrides: list[str]) -> None:
    overrides = [*tiny_overrides, *LEARNING, "encoder=poisson", "train.limit_batches=4"]
    cfg = load_config(overrides)
    fit(cfg, tmp_path / "a")
    fit(cfg, tmp_path / "b")
    losses = train_losses(tmp_path / "a")
    assert len(losses) == 4
    assert losses == train_losses(tmp_path / "b")
    assert len(set(losses)) == 4
    fit(load_config([*overrides, "train.seed=1"]), tmp_path / "c")
    assert train_losses(tmp_path / "c") != losses


def test_training_learns_a_simple_task(tmp_path: Path, tiny_overrides: list[str]) -> None:
    cfg = load_config([*tiny_overrides, *LEARNING, "train.epochs=3", "log.every_n_steps=100"])
    history = fit(cfg, tmp_path)
    assert history[-1].test_accuracy >= 0.9
    assert history[-1].train_loss < 0.5 * history[0].train_loss


def test_hydra_main_returns_the_final_test_accuracy(tmp_path: Path, tiny_overrides: list[str]) -> None:
    with initialize_config_module(config_module="snn_train.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*tiny_overrides, "train.limit_batches=2"], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    accuracy = run(cfg)
    assert accuracy == json.loads((tmp_path / "metrics.json").read_text())["final"]["test_accuracy"]


def test_network_from_plain_arguments_backpropagates_per_time_step_gradients() -> None:
    lif = LIFParameters(tau_syn_inv=200.0, tau_mem_inv=100.0, v_leak=0.0, v_th=1.0, v_reset=0.0, dt=1e-3, surrogate="super", alpha=10.0)
    readout = LIParameters(tau_syn_inv=200.0, tau_mem_inv=100.0, v_leak=0.0, dt=1e-3)
    network = ConvSNN(
        input_shape=(1, 32, 32), conv_channels=[32, 64], kernel_sizes=[5, 5], conv_scales=[1.0, 10.0], pool_size=2,
        fc_features=[1024], num_classes=10, readout_bias=False, lif=lif, readout=readout,
    )
    assert network.fcs[0].in_features == 64 * 5 * 5
    torch.manual_seed(0)
    voltages = network(torch.rand(8, 3, 1, 32, 32) * 4)
    assert voltages.shape == (8, 3, 10)
    grad = torch.zeros_like(voltages)
    grad[-1] = 1.0  # only the last step: earlier readout steps must still receive gradient through time
    voltages.backward(grad)
    assert network.convs[0].weight.grad.abs().sum() > 0
    text = repr(network)
    assert "LIF(tau_syn_inv=200.0, tau_mem_inv=100.0" in text and "surrogate=super, alpha=10.0" in text


def test_too_small_an_image_is_refused_with_a_reason() -> None:
    cfg = load_config([])
    with pytest.raises(ValueError, match="too small"):
        ConvSNN.from_config(cfg.model, (1, 12, 12))


def test_bf16_training_learns_as_fp32_does(tmp_path: Path, tiny_overrides: list[str]) -> None:
    overrides = [*tiny_overrides, *LEARNING, "train.epochs=3", "log.every_n_steps=100"]
    fp32 = fit(load_config(overrides), tmp_path / "fp32")
    bf16 = fit(load_config([*overrides, "train.precision=bf16"]), tmp_path / "bf16")
    assert bf16[-1].test_accuracy >= 0.9
    assert abs(bf16[-1].train_loss - fp32[-1].train_loss) < 0.25 * fp32[0].train_loss
    assert bf16[-1].train_loss != fp32[-1].train_loss


def test_compiled_kernels_train_as_the_eager_ones(tmp_path: Path, tiny_overrides: list[str]) -> None:
    overrides = [*tiny_overrides, *LEARNING, "train.limit_batches=4"]
    fit(load_config(overrides), tmp_path / "eager")
    fit(load_config([*overrides, "train.compile=true"]), tmp_path / "compiled")
    eager, compiled = train_losses(tmp_path / "eager"), train_losses(tmp_path / "compiled")
    assert len(set(eager)) == 4
    assert compiled == pytest.approx(eager, rel=1e-4)
