"""Every config group option composes and builds; impossible values are refused with a useful message."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from snn_train import ConvSNN, load_config
from snn_train.data import DATASETS, load_split
from snn_train.encoders import EVENT_ENCODERS, build_encoder
from snn_train.errors import ConfigError
from snn_train.schema import flat_config
from snn_train.task import build_optimizer, decode

from conftest import make_mnist

CONFIGS = Path(__file__).parents[1] / "configs"


def options(group: str) -> list[str]:
    return sorted(path.stem for path in (CONFIGS / group).glob("*.yaml"))


def test_the_groups_offer_the_documented_options() -> None:
    assert options("model") == ["atan", "circ", "erfc", "super", "tanh", "triangle"]
    assert options("encoder") == ["constant_current", "direct", "events", "latency", "poisson"]
    assert options("data") == ["fashion_mnist", "kmnist", "mnist", "nmnist"]
    assert options("optim") == ["adam", "adamw", "sgd"]
    assert options("experiment") == ["best", "fast"]


@pytest.mark.parametrize("experiment", options("experiment"))
def test_each_experiment_preset_sets_its_values_over_the_defaults(experiment: str) -> None:
    preset = flat_config(OmegaConf.load(CONFIGS / "experiment" / f"{experiment}.yaml"))
    composed = flat_config(load_config([f"+experiment={experiment}"]))
    assert preset and {key: composed.get(key, "absent") for key in preset} == preset
    assert composed["data.root"] == flat_config(load_config())["data.root"]  # what it does not set stays the default


@pytest.mark.parametrize("model", options("model"))
def test_every_model_option_builds_a_network_that_backpropagates(model: str) -> None:
    cfg = load_config([f"model={model}", "seq_length=3"])
    assert cfg.model.surrogate == model
    network = ConvSNN.from_config(cfg.model, (1, 28, 28))
    voltages = network(torch.rand(3, 2, 1, 28, 28) * 5)
    assert voltages.shape == (3, 2, 10)
    voltages.backward(torch.ones_like(voltages))
    assert network.readout_linear.weight.grad is not None


@pytest.mark.parametrize("encoder", [name for name in options("encoder") if name not in EVENT_ENCODERS])
def test_every_image_encoder_option_builds_and_encodes(encoder: str) -> None:
    cfg = load_config([f"encoder={encoder}", "seq_length=5"])
    encoded = build_encoder(cfg.encoder, cfg.seq_length)(torch.rand(2, 1, 28, 28))
    assert encoded.shape == (5, 2, 1, 28, 28)


@pytest.mark.parametrize("optim", options("optim"))
def test_every_optim_option_builds_its_optimizer(optim: str) -> None:
    cfg = load_config([f"optim={optim}", "optim.lr=0.01"])
    optimizer = build_optimizer(torch.nn.Linear(1, 1), cfg.optim)
    assert type(optimizer).__name__.lower() == optim
    assert optimizer.param_groups[0]["lr"] == 0.01


@pytest.mark.parametrize("data", [name for name in options("data") if not DATASETS[name].events])
def test_every_image_data_option_loads_its_torchvision_folder(data: str, tmp_path: Path) -> None:
    folder = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "kmnist": "KMNIST"}[data]
    make_mnist(tmp_path, folder, n_train=20, n_test=10)
    cfg = load_config([f"data={data}", f"data.root={tmp_path}", "data.download=false"])
    split = load_split(cfg.data, train=False, seq_length=cfg.seq_length)
    assert split.images.shape == (10, 28, 28) and split.images.dtype == torch.uint8
    assert split.labels.tolist() == [k % 10 for k in range(10)]


def test_decoders_reduce_over_time() -> None:
    voltages = torch.tensor([[[1.0, 5.0]], [[3.0, 2.0]], [[2.0, 2.0]]])  # [T=3, B=1, 2]
    assert decode(voltages, "max").tolist() == [[3.0, 5.0]]
    assert decode(voltages, "mean").tolist() == [[2.0, 3.0]]
    assert decode(voltages, "last").tolist() == [[2.0, 2.0]]


@pytest.mark.parametrize(
    "override, message",
    [
        ("seq_length=0", "seq_length must be > 0"),
        ("train.batch_size=-4", "train.batch_size must be > 0"),
        ("optim.lr=0", "optim.lr must be > 0"),
        ("model.lif.v_th=0", "must be above model.lif.v_reset"),
        ("model.lif.tau_mem_inv=-1", "model.lif.tau_mem_inv must be > 0"),
        ("model.readout.tau_syn_inv=0", "model.readout.tau_syn_inv must be > 0"),
        ("model.lif.alpha=0", "model.lif.alpha must be > 0"),
        ("decoder=median", "decoder=median is not one of max, mean, last"),
        ("scheduler=step", "scheduler=step is not one of none, cosine"),
        ("train.device=tpu", "train.device=tpu is not"),
        ("train.limit_batches=0", "train.limit_batches must be > 0"),
        ("train.precision=fp16", "train.precision=fp16 is not one of fp32, bf16"),
        ("model.dropout=1", "model.dropout is a probability in [0, 1), got 1"),
        ("model.dropout=-0.1", "model.dropout is a probability in [0, 1), got -0.1"),
        ("loss.label_smoothing=1", "loss.label_smoothing must lie in [0, 1), got 1"),
        ("loss.label_smoothing=-0.1", "loss.label_smoothing must lie in [0, 1), got -0.1"),
        ("warmup_epochs=-0.5", "warmup_epochs must lie in 0..train.epochs"),
        ("train.epochs=2 warmup_epochs=2.5", "warmup_epochs must lie in 0..train.epochs (2), got 2.5"),
        ("augment.shift=-1", "augment.shift must be >= 0 (0 = off), got -1"),
        ("augment.rotate=-5", "augment.rotate must be >= 0 (0 = off), got -5"),
        ("augment.scale=-0.1", "augment.scale must be >= 0 (0 = off), got -0.1"),
        ("augment.scale=1", "augment.scale is a relative zoom and must be < 1, got 1"),
        ("data.val_size=-1", "data.val_size must be >= 0 (0 = no validation split), got -1"),
        ("data.split_seed=-1", "data.split_seed must lie in 0..2**63-1, got -1"),
        ("log.val_every_n_steps=0", "log.val_every_n_steps must be > 0"),
        ("train.early_stopping_patience=0", "train.early_stopping_patience must be > 0"),
        ("data.val_size=0 train.early_stopping_patience=3", "train.early_stopping_patience needs a validation split"),
        ("train.test_on=middle", "train.test_on=middle is not one of best, last"),
        ("train.ema_decay=1", "train.ema_decay must lie in (0, 1), e.g. 0.999 (null = off), got 1"),
        ("train.ema_decay=0", "train.ema_decay must lie in (0, 1), e.g. 0.999 (null = off), got 0"),
        ("train.ema_decay=-0.5", "train.ema_decay must lie in (0, 1), e.g. 0.999 (null = off), got -0.5"),
        (
            "model.learn_tau_mem=true model.lif.dt=0.001 model.lif.tau_mem_inv=1000",
            "model.learn_tau_mem needs model.lif.dt·tau_mem_inv < 1",
        ),
    ],
)
def test_impossible_values_are_refused_with_the_key_named(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(override.split())


def test_values_at_the_edges_of_the_allowed_ranges_are_accepted() -> None:
    # warm-up over the whole run; dt·tau_mem_inv = 1 with a fixed time constant (only a learned one must stay below 1)
    cfg = load_config(
        [
            "model.dropout=0.9",
            "loss.label_smoothing=0.5",
            "train.epochs=2",
            "warmup_epochs=2",
            "augment.scale=0.5",
            "model.lif.dt=0.001",
            "model.lif.tau_mem_inv=1000",
        ]
    )
    assert (cfg.model.dropout, cfg.warmup_epochs, cfg.model.lif.dt * cfg.model.lif.tau_mem_inv) == (0.9, 2, 1)


def test_without_tonic_data_nmnist_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tonic", None)  # as if the events extra were not installed
    with pytest.raises(ConfigError) as raised:
        load_config(["data=nmnist", "encoder=events"])
    assert str(raised.value).startswith("data=nmnist needs tonic, which the optional extra events installs: ")
    assert "pip install 'snn-train[events]'" in str(raised.value)
    load_config([])  # image data needs nothing more


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_is_refused() -> None:
    with pytest.raises(ConfigError, match="no CUDA GPU is available; use train.device=cpu"):
        load_config(["train.device=cuda"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.epoch=2", "Could not override 'train.epoch'"),
        ("model=supr", "Could not find 'model/supr'"),
        ("train.epochs=many", "Error merging override train.epochs=many"),
        ("encoder.f_max=10", "Could not override 'encoder.f_max'"),
    ],
)
def test_unknown_keys_options_and_wrong_types_do_not_compose(override: str, message: str) -> None:
    with pytest.raises(ConfigCompositionException, match=re.escape(message)):
        load_config([override])
