"""The learning problem: the network and encoder for a config, decoding, the loss, optimizers and schedules.

Each choice is a registry here (``DECODERS``, ``OPTIMIZERS``, ``SCHEDULERS``, ``PRECISIONS``); the config checks
take their names from them, so adding one is an entry here plus, for optimizers, a file in configs/optim/.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import torch
from omegaconf import DictConfig
from torch import nn
from torch.nn import functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from snn_train import distributed, lif_cpu
from snn_train.augment import random_affine
from snn_train.data import NUM_CLASSES, Split
from snn_train.errors import ConfigError
from snn_train.model import ConvSNN
from snn_train.schema import AugmentConfig, Config, LossConfig, OptimConfig

DECODERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {  # ``decoder``: readout voltages over time → logits
    "max": lambda voltages: voltages.max(dim=0).values,
    "mean": lambda voltages: voltages.mean(dim=0),
    "last": lambda voltages: voltages[-1],
}


def decode(voltages: torch.Tensor, decoder: str) -> torch.Tensor:
    """Readout voltages [T, B, classes] into logits [B, classes], by the named ``DECODERS`` entry."""
    return DECODERS[decoder](voltages)


def objective(voltages: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, loss_cfg: LossConfig) -> torch.Tensor:
    """The training loss summed over the batch: cross-entropy of the decoded logits or, with ``loss.per_step``, the
    mean over time steps of the cross-entropy of each step's readout voltages; label smoothing as configured."""
    smoothing = loss_cfg.label_smoothing
    if loss_cfg.per_step:
        steps = len(voltages)
        targets = labels.repeat(steps)
        per_step = F.cross_entropy(voltages.flatten(0, 1), targets, reduction="sum", label_smoothing=smoothing)
        return per_step / steps
    return F.cross_entropy(logits, labels, reduction="sum", label_smoothing=smoothing)


def _beta1(optim_cfg: OptimConfig) -> float:
    """Adam's and AdamW's ``momentum``: beta1, the decay of the first-moment estimate, below 1."""
    if optim_cfg.momentum >= 1:
        raise ConfigError(f"optim.momentum is {optim_cfg.name}'s beta1 and must be < 1, got {optim_cfg.momentum}")
    return optim_cfg.momentum


# Each optimizer runs fused: one kernel per parameter group (CPU or GPU) instead of several tensor passes per parameter.
def _adam(groups: list[dict], optim_cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.Adam(groups, lr=optim_cfg.lr, betas=(_beta1(optim_cfg), 0.999), fused=True)


def _adamw(groups: list[dict], optim_cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=optim_cfg.lr, betas=(_beta1(optim_cfg), 0.999), fused=True)


def _sgd(groups: list[dict], optim_cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=optim_cfg.lr, momentum=optim_cfg.momentum, fused=True)


OPTIMIZERS: dict[str, Callable[[list[dict], OptimConfig], torch.optim.Optimizer]] = {  # optim.name → builder
    "adam": _adam,
    "adamw": _adamw,
    "sgd": _sgd,
}


def build_optimizer(model: nn.Module, optim_cfg: OptimConfig) -> torch.optim.Optimizer:
    """The ``OPTIMIZERS`` entry named by optim.name. Adam and AdamW take ``momentum`` as beta1; SGD as its momentum.
    Weight decay applies to the conv and fc weights only, not to biases, batch-norm parameters, thresholds or time
    constants."""
    parameters = list(model.parameters())
    groups = [
        {"params": [p for p in parameters if p.dim() >= 2], "weight_decay": optim_cfg.weight_decay},
        {"params": [p for p in parameters if p.dim() < 2], "weight_decay": 0.0},
    ]
    return OPTIMIZERS[optim_cfg.name](groups, optim_cfg)


SCHEDULERS: dict[str, Callable[[int, int], float]] = {  # ``scheduler``: (steps since warm-up, steps after it) → factor
    "none": lambda done, span: 1.0,
    "cosine": lambda done, span: 0.5 * (1 + math.cos(math.pi * done / span)),
}


def learning_rate_factor(step: int, total_steps: int, warmup_steps: int, name: str) -> float:
    """The learning rate after ``step`` optimizer steps, as a fraction of optim.lr: a linear warm-up over
    ``warmup_steps``, then the ``SCHEDULERS`` entry: constant (``none``) or a cosine down to zero at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return SCHEDULERS[name](step - warmup_steps, max(total_steps - warmup_steps, 1))


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: Config, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR | None:
    """``learning_rate_factor`` over the run's steps; None when the rate is constant (no warm-up, no cosine)."""
    total_steps, warmup_steps = cfg.train.epochs * steps_per_epoch, round(cfg.warmup_epochs * steps_per_epoch)
    if cfg.scheduler == "none" and warmup_steps == 0:
        return None
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate_factor(step, total_steps, warmup_steps, cfg.scheduler)
    )


def build_average(model: nn.Module, decay: float | None) -> AveragedModel | None:
    """The exponential moving average of ``model``'s weights for train.ema_decay (None when it is null), updated by
    ``update_parameters(model)`` after each optimizer step: w_ema ← d·w_ema + (1 − d)·w, parameters and buffers
    (batch-norm running statistics) alike. Its first update copies the weights (w_ema = w at n_averaged = 0), so the
    average never holds the initial weights once training has begun."""
    if decay is None:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}  # train.precision → autocast dtype (None: autocast off)


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """Mixed precision for ``train.precision=bf16``: convolutions and matmuls in bfloat16, neuron state in float32,
    spikes handed on in bfloat16."""
    dtype = PRECISIONS[precision]
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def bf16_emulated(device: torch.device, precision: str) -> bool:
    """Whether ``precision`` asks for bfloat16 on a CPU without it in hardware (AVX512-BF16 or AMX, as oneDNN reports):
    there it is emulated, several times slower than float32."""
    return precision == "bf16" and device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported()


def seed_everything(seed: int) -> None:
    """Python's and torch's global random states: the encoder's, augmentation's and dropout's draws follow them. The
    same seed, the same run on a GPU too, where cuDNN then picks only deterministic algorithms."""
    random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = True


def encoded_shard(
    encoder: nn.Module, split: Split, index: torch.Tensor, augment_cfg: AugmentConfig | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's part of the encoded batch ``index`` (randomly transformed if ``augment_cfg`` is given) and its
    labels.

    Every rank transforms and encodes the whole batch, so the random draws, and the random states after them, are a
    single process's: a distributed run sees the same input, and every rank's random state is the one rank 0
    checkpoints.
    """
    inputs = split.encoder_input(index)
    encoded = encoder(inputs if augment_cfg is None else random_affine(inputs, augment_cfg))
    part = distributed.shard(len(index))
    return encoded[:, part], split.labels[index[part]]


def build_model(cfg: Config | DictConfig, input_shape: tuple[int, ...], device: torch.device) -> ConvSNN:
    """The configured network for this data; one that cannot be built (too big, too deep for the images) is a config
    error. With train.compile on the CPU, the C++ LIF kernels are built here, before training."""
    if cfg.model.num_classes < NUM_CLASSES:
        raise ConfigError(f"model.num_classes={cfg.model.num_classes} but {cfg.data.name} has {NUM_CLASSES} classes")
    try:
        model = ConvSNN.from_config(cfg.model, input_shape, cfg.train.compile, cfg.model.kernel).to(device)
    except (ValueError, TypeError, RuntimeError) as error:  # a size torch cannot take or allocate
        raise ConfigError(f"cannot build the network from model.*: {str(error).strip().splitlines()[0]}") from None
    build_cpu_kernels(cfg.train.compile, device, "train.compile")
    return model


def build_cpu_kernels(compiled: bool, device: torch.device, key: str) -> None:
    """With compiled kernels on the CPU, build lif_cpu.cpp now (cached after the first time), before the work, so that
    a missing compiler is one ConfigError naming ``key`` (the option that asked for them) and the way out."""
    if not (compiled and device.type == "cpu"):
        return
    try:
        lif_cpu.library()
    except (OSError, RuntimeError) as error:
        reason = str(error).strip().splitlines()[0].split(": [")[0]  # not the compiler's command line
        raise ConfigError(
            f"{key}=true builds the CPU LIF kernels with a C++ compiler and ninja, which failed "
            f"({reason}); install them, or use {key}=false"
        ) from None
