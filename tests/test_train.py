"""The training loop in-process: it learns, it is reproducible, and the Hydra main returns the accuracy; the loss, the
learning-rate schedule and weight decay against closed forms."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.nn import functional as F

from snn_train import ConvSNN, LIFParameters, LIParameters, load_config
from snn_train.cli import run
from snn_train.config import compose
from snn_train.start import start_run
from snn_train.task import build_optimizer, build_scheduler, decode, learning_rate_factor, objective
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
    history = fit(cfg, tmp_path).history
    assert history[-1].test_accuracy >= 0.9
    assert history[-1].train_loss < 0.5 * history[0].train_loss


@pytest.mark.parametrize("val_size", [0, 20])
def test_hydra_main_returns_the_best_validation_accuracy_or_without_a_split_the_test_accuracy(
    tmp_path: Path, tiny_overrides: list[str], val_size: int
) -> None:
    overrides = [*tiny_overrides, *LEARNING, "train.limit_batches=3", f"data.val_size={val_size}"]
    cfg = compose("config", [*overrides, "log.val_every_n_steps=1"], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    returned = run(cfg)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    if val_size:
        assert returned == max(v["accuracy"] for v in metrics["validations"]) == metrics["final"]["best_val_accuracy"]
        assert len(metrics["validations"]) == 3 and returned != metrics["final"]["test_accuracy"]
    else:
        assert returned == metrics["final"]["test_accuracy"] == metrics["epochs"][-1]["test_accuracy"]


def test_network_from_plain_arguments_backpropagates_per_time_step_gradients() -> None:
    lif = LIFParameters(
        tau_syn_inv=200.0, tau_mem_inv=100.0, v_leak=0.0, v_th=1.0, v_reset=0.0, dt=1e-3, surrogate="super", alpha=10.0
    )
    readout = LIParameters(tau_syn_inv=200.0, tau_mem_inv=100.0, v_leak=0.0, dt=1e-3)
    network = ConvSNN(
        input_shape=(1, 32, 32),
        conv_channels=[32, 64],
        kernel_sizes=[5, 5],
        conv_scales=[1.0, 10.0],
        pool_size=2,
        fc_features=[1024],
        num_classes=10,
        readout_bias=False,
        lif=lif,
        readout=readout,
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
    fp32 = fit(load_config(overrides), tmp_path / "fp32").history
    bf16 = fit(load_config([*overrides, "train.precision=bf16"]), tmp_path / "bf16").history
    assert bf16[-1].test_accuracy >= 0.9
    assert abs(bf16[-1].train_loss - fp32[-1].train_loss) < 0.25 * fp32[0].train_loss
    assert bf16[-1].train_loss != fp32[-1].train_loss


@pytest.mark.parametrize("native", [True, False])
def test_bf16_says_once_at_start_where_the_cpu_only_emulates_it(
    native: bool, tmp_path: Path, tiny_overrides: list[str], monkeypatch, caplog
) -> None:
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native)
    run = start_run(load_config([*tiny_overrides, "train.precision=bf16"]), tmp_path)
    run.logger.close()
    emulated = [record for record in caplog.records if "emulated" in record.getMessage()]
    assert len(emulated) == (0 if native else 1) and all(record.levelname == "WARNING" for record in emulated)


@pytest.mark.slow
def test_compiled_kernels_train_as_the_eager_ones(tmp_path: Path, tiny_overrides: list[str]) -> None:
    overrides = [*tiny_overrides, *LEARNING, "train.limit_batches=4"]
    fit(load_config(overrides), tmp_path / "eager")
    fit(load_config([*overrides, "train.compile=true"]), tmp_path / "compiled")
    eager, compiled = train_losses(tmp_path / "eager"), train_losses(tmp_path / "compiled")
    assert len(set(eager)) == 4
    assert compiled == pytest.approx(eager, rel=1e-4)


def loss_cfg(per_step: bool, label_smoothing: float = 0.0):
    return OmegaConf.create({"per_step": per_step, "label_smoothing": label_smoothing})


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_a_logged_spike_rate_is_the_mean_of_the_spikes_the_histogram_steps_keep(
    compiled: bool, tmp_path: Path, tiny_overrides: list[str]
) -> None:
    """Every logged step's spike rate comes from the kernels' count; on a histogram step, where the full spikes are
    kept too, it is their mean per neuron and step (conv2's and fc1's histograms hold every sample's spike count per
    neuron here, fewer than HISTOGRAM_SAMPLE values)."""
    overrides = [*tiny_overrides, *LEARNING, "train.limit_batches=4", f"train.compile={str(compiled).lower()}"]
    fit(load_config(overrides), tmp_path)  # log.every_n_steps=1, log.histogram_every_n_steps=2
    events = EventAccumulator(str(tmp_path), size_guidance={"histograms": 0})
    events.Reload()
    for layer in ("conv2", "fc1"):
        rates = {scalar.step: scalar.value for scalar in events.Scalars(f"SpikeRate/{layer}")}
        assert list(rates) == [1, 2, 3, 4] and rates[2] > 0 and rates[4] > 0
        counts = events.Histograms(f"SpikeCount/{layer}")
        assert [count.step for count in counts] == [2, 4]
        for count in counts:
            mean = count.histogram_value.sum / count.histogram_value.num / 8  # seq_length=8
            assert rates[count.step] == pytest.approx(mean, rel=1e-6)


def test_per_step_loss_is_the_mean_over_time_of_each_steps_cross_entropy() -> None:
    torch.manual_seed(0)
    voltages, labels = torch.randn(5, 7, 10), torch.randint(0, 10, (7,))
    logits = decode(voltages, "max")
    expected = sum(F.cross_entropy(voltages[t], labels, reduction="sum") for t in range(5)) / 5
    assert objective(voltages, logits, labels, loss_cfg(per_step=True)).item() == pytest.approx(
        expected.item(), rel=1e-6
    )
    assert objective(voltages, logits, labels, loss_cfg(per_step=False)).item() == pytest.approx(
        F.cross_entropy(logits, labels, reduction="sum").item(), rel=1e-6
    )


@pytest.mark.parametrize("per_step", [False, True])
def test_label_smoothing_mixes_in_the_mean_cross_entropy_over_all_classes(per_step: bool) -> None:
    torch.manual_seed(1)
    voltages, labels = torch.randn(4, 6, 10), torch.randint(0, 10, (6,))
    logits = decode(voltages, "mean")
    scored = voltages if per_step else logits.unsqueeze(0)
    log_p = torch.log_softmax(scored, dim=-1)  # [steps, B, classes]
    true_class = -log_p.gather(-1, labels.expand(len(scored), -1).unsqueeze(-1)).squeeze(-1)
    expected = ((1 - 0.2) * true_class + 0.2 * -log_p.mean(-1)).sum() / len(scored)
    assert objective(voltages, logits, labels, loss_cfg(per_step, 0.2)).item() == pytest.approx(
        expected.item(), rel=1e-6
    )


def scheduled_rates(scheduler_cfg: list[str], steps_per_epoch: int, lr: float = 0.1) -> list[float]:
    """The learning rate of every optimizer step of a run, then the one after its last step, as build_scheduler
    sets it."""
    cfg = load_config([*scheduler_cfg, f"optim.lr={lr}"])
    optimizer = build_optimizer(nn.Linear(2, 2), cfg.optim)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch)
    rates = []
    for _ in range(cfg.train.epochs * steps_per_epoch + 1):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_cosine_without_warm_up_is_torchs_cosine_annealing() -> None:
    optimizer = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=14)  # the scheduler before warm-up existed
    expected = []
    for _ in range(15):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        cosine.step()
    assert scheduled_rates(["scheduler=cosine", "warmup_epochs=0", "train.epochs=2"], 7) == pytest.approx(
        expected, rel=1e-6, abs=1e-12
    )
    assert [0.1 * learning_rate_factor(step, 14, 0, "cosine") for step in range(15)] == pytest.approx(
        expected, rel=1e-6, abs=1e-12
    )


def test_warm_up_rises_linearly_to_the_full_rate_then_anneals_to_zero() -> None:
    total, warmup = 20, 5
    factors = [learning_rate_factor(step, total, warmup, "cosine") for step in range(total + 1)]
    assert factors[:warmup] == pytest.approx([(step + 1) / warmup for step in range(warmup)])
    assert factors[warmup:] == pytest.approx(
        [0.5 * (1 + math.cos(math.pi * s / (total - warmup))) for s in range(total - warmup + 1)]
    )
    assert factors[warmup] == 1 and factors[-1] == pytest.approx(0, abs=1e-12)
    assert all(a > b for a, b in zip(factors[warmup:], factors[warmup + 1 :]))
    assert [learning_rate_factor(step, total, warmup, "none") for step in range(warmup - 1, total + 1)] == [1.0] * (
        total - warmup + 2
    )
    # warmup_epochs=0.5 of 8 steps per epoch: 4 steps of warm-up; then the rate stays at optim.lr without a cosine
    assert scheduled_rates(["scheduler=none", "warmup_epochs=0.5", "train.epochs=1"], 8) == pytest.approx(
        [0.025, 0.05, 0.075, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]
    )


def test_a_constant_rate_needs_no_scheduler() -> None:
    cfg = load_config(["scheduler=none", "warmup_epochs=0"])
    assert build_scheduler(build_optimizer(nn.Linear(2, 2), cfg.optim), cfg, 10) is None


@pytest.mark.parametrize("optim", ["adam", "adamw", "sgd"])
def test_weight_decay_shrinks_weights_but_not_biases_norms_thresholds_or_time_constants(optim: str) -> None:
    cfg = load_config([f"optim={optim}", "optim.lr=0.01", "optim.weight_decay=0.1"])
    network = ConvSNN.from_config(
        load_config(
            [
                "model.conv_channels=[4,6]",
                "model.kernel_sizes=[3,3]",
                "model.fc_features=[16]",
                "model.batch_norm=true",
                "model.learn_tau_mem=true",
                "model.learn_v_th=true",
            ]
        ).model,
        (1, 16, 16),
    )
    optimizer = build_optimizer(network, cfg.optim)
    names = {id(p): name for name, p in network.named_parameters()}
    decayed, kept = ({names[id(p)] for p in group["params"]} for group in optimizer.param_groups)
    assert decayed == {"convs.0.weight", "convs.1.weight", "fcs.0.weight", "readout_linear.weight"}
    assert (
        decayed | kept == set(names.values())
        and {"norms.0.weight", "conv_lifs.0.v_th", "fc_lifs.0.tau_mem_logit"} <= kept
    )
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.1, 0.0]

    before = {name: p.detach().clone() for name, p in network.named_parameters()}
    for p in network.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for name, p in network.named_parameters():
        if name not in decayed:
            assert torch.equal(p, before[name]), name
        elif optim == "adam":  # L2 in the gradient g = decay·w: Adam's first step is lr·g/(|g| + eps), towards 0
            decay_gradient = 0.1 * before[name]
            assert torch.allclose(p, before[name] - 0.01 * decay_gradient / (decay_gradient.abs() + 1e-8), atol=1e-7), (
                name
            )
        else:  # decoupled (AdamW), or L2 times lr (SGD's first step): w·(1 - lr·decay)
            assert torch.allclose(p, before[name] * (1 - 0.01 * 0.1), rtol=1e-6), name


def test_a_resumed_schedule_follows_the_new_number_of_epochs() -> None:
    cfg = load_config(["scheduler=cosine", "warmup_epochs=0", "train.epochs=1", "optim.lr=0.1"])
    optimizer = build_optimizer(nn.Linear(2, 2), cfg.optim)
    finished = build_scheduler(optimizer, cfg, 6)
    for _ in range(6):
        optimizer.step()
        finished.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0, abs=1e-12)
    longer = load_config(["scheduler=cosine", "warmup_epochs=0", "train.epochs=3", "optim.lr=0.1"])
    resumed = build_scheduler(optimizer, longer, 6)
    resumed.load_state_dict(finished.state_dict())
    optimizer.step()
    resumed.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * learning_rate_factor(7, 18, 0, "cosine"), rel=1e-9)
