"""The convolutional LIF network, assembled from the ``model`` config or from plain arguments."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from snn_train.lif_kernels import KERNELS
from snn_train.neurons import LIFParameters, LIParameters, li_sequence
from snn_train.schema import ModelConfig


@dataclass
class LayerTrace:
    """What one LIF layer did over a sequence, [T, B, ...], detached: its spikes (unless only counted), the events it
    sends on (a conv layer's spikes max-pooled, one per pooling window with a spike; an fc layer's spikes), if recorded
    its membrane voltages, the number of its spikes and its neurons per sample."""

    spikes: torch.Tensor | None
    events: torch.Tensor
    voltage: torch.Tensor | None
    spike_count: torch.Tensor  # float64 scalar: spikes over all steps and samples
    neurons: int

    @property
    def spike_rate(self) -> float:
        """Spikes per neuron per step."""
        steps, samples = self.events.shape[:2]
        return self.spike_count.item() / (steps * samples * self.neurons)


class LIF(nn.Module):
    """A layer of LIF neurons: input currents [T, B, ...] to spikes [T, B, ...] in one call.

    ``learn_tau_mem`` and ``learn_v_th`` make the layer's membrane time constant and threshold parameters (one each,
    PLIF style); the time constant as dt·tau_mem_inv = sigmoid(w), which keeps the Euler step stable. ``kernel``
    (``model.kernel``) names the ``KERNELS`` entry that runs the sequence.
    """

    def __init__(
        self,
        p: LIFParameters,
        compiled: bool = False,
        learn_tau_mem: bool = False,
        learn_v_th: bool = False,
        kernel: str = "auto",
    ) -> None:
        super().__init__()
        self.p = p
        self.compiled = compiled
        self.kernel = kernel
        decay = p.dt * p.tau_mem_inv
        self.tau_mem_logit = nn.Parameter(torch.tensor(math.log(decay / (1 - decay)))) if learn_tau_mem else None
        self.v_th = nn.Parameter(torch.tensor(p.v_th)) if learn_v_th else None

    def tau_mem_inv(self) -> torch.Tensor | None:
        """The learned inverse membrane time constant, or None if it is the fixed p.tau_mem_inv."""
        return None if self.tau_mem_logit is None else torch.sigmoid(self.tau_mem_logit) / self.p.dt

    def forward(
        self,
        currents: torch.Tensor,
        trace: dict[str, LayerTrace] | None = None,
        name: str = "",
        record_voltage: bool = True,
        pool: int = 1,
        keep_spikes: bool = True,
    ) -> torch.Tensor:
        """Spikes [T, B, ...], max-pooled over pool×pool windows of the last two dims if ``pool`` > 1 (a conv layer's;
        by the kernel itself where it can); with ``trace``, records under ``name`` the spike count and, if asked, the
        full spikes and voltages.

        The output always comes from the pooled kernel, which also counts the spikes. Full spikes or voltages take a
        second run of the forward kernel, unpooled and without autograd (the same arithmetic, so the same spikes): far
        cheaper than pooling the full spikes and back-propagating through that pooling, which made a logged training
        step half again as slow as another. Counting alone (``keep_spikes=False`` without voltages, as evaluation and
        logged training steps that bin no histograms ask) needs no second run.
        """
        run, tau_mem_inv = KERNELS[self.kernel](currents), self.tau_mem_inv()
        count = None if trace is None else torch.zeros((), dtype=torch.float64, device=currents.device)
        spikes = run(currents, self.p, False, self.compiled, tau_mem_inv, self.v_th, pool, count)[0]
        if trace is not None:
            full, voltage = None, None
            if keep_spikes or record_voltage:
                with torch.no_grad():
                    full, voltage = run(currents, self.p, record_voltage, self.compiled, tau_mem_inv, self.v_th)
            trace[name] = LayerTrace(full, spikes.detach(), voltage, count, currents[0, 0].numel())
        return spikes

    def extra_repr(self) -> str:
        p = self.p
        return (
            f"tau_syn_inv={p.tau_syn_inv}, tau_mem_inv={p.tau_mem_inv}, v_leak={p.v_leak}, v_th={p.v_th}, "
            f"v_reset={p.v_reset}, dt={p.dt}, surrogate={p.surrogate}, alpha={p.alpha}, "
            f"learn_tau_mem={self.tau_mem_logit is not None}, learn_v_th={self.v_th is not None}, "
            f"compiled={self.compiled}, kernel={self.kernel}"
        )


class LI(nn.Module):
    """Leaky-integrator readout: input currents [T, B, N] to voltages [T, B, N]."""

    def __init__(self, p: LIParameters) -> None:
        super().__init__()
        self.p = p

    def forward(self, currents: torch.Tensor) -> torch.Tensor:
        return li_sequence(currents, self.p)

    def extra_repr(self) -> str:
        p = self.p
        return f"tau_syn_inv={p.tau_syn_inv}, tau_mem_inv={p.tau_mem_inv}, v_leak={p.v_leak}, dt={p.dt}"


def convolve_over_time(conv: nn.Conv2d, norm: nn.Module, x: torch.Tensor, scale: float) -> torch.Tensor:
    """scale·norm(conv(x)) at every step of [T, B, C, H, W], in channels-last layout (faster convolution and pooling
    on CPU). A batch norm's statistics are taken over time and batch together.

    A time-invariant input (stride 0 over T, as the direct encoder gives) is convolved once and the result repeated
    (its statistics over time and batch are those over the batch).
    """
    step = x[0] if x.stride(0) == 0 else x.flatten(0, 1)
    currents = norm(conv(step.contiguous(memory_format=torch.channels_last))) * scale
    # one input channel: torch cannot tell the layouts apart and returns the contiguous one; the LIF kernel pools
    # channels-last currents faster
    currents = currents.contiguous(memory_format=torch.channels_last)
    if x.stride(0) == 0:
        return currents.expand(x.shape[0], -1, -1, -1, -1)
    return currents.unflatten(0, x.shape[:2])


def normalised_over_time(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """norm(x) at every step of [T, B, features]: a batch norm's statistics are taken over time and batch together,
    as convolve_over_time's."""
    return norm(x.flatten(0, 1)).unflatten(0, x.shape[:2])


def dropout_over_time(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Dropout on [T, B, ...] with one mask for all time steps: a dropped neuron is silent for the whole sample."""
    if not training or p == 0:
        return x
    return x * (torch.bernoulli(torch.full_like(x[0], 1 - p)) / (1 - p))


def conv_fan_out(conv: nn.Conv2d, input_size: Sequence[int]) -> torch.Tensor:
    """Synapses each input position [H, W] drives in ``conv`` (stride 1, no padding): out_channels times the
    output positions whose k×k window covers it, k² inside and fewer near the border."""
    k = conv.kernel_size[0]
    covered = torch.ones(1, 1, input_size[0] - k + 1, input_size[1] - k + 1, device=conv.weight.device)
    return F.conv_transpose2d(covered, torch.ones(1, 1, k, k, device=conv.weight.device))[0, 0] * conv.out_channels


class ConvSNN(nn.Module):
    """conv → [batch norm] → ×scale → LIF → maxpool (per conv layer) → [dropout] → fc → [batch norm] → LIF (per fc
    layer) → [dropout] → linear → LI readout.

    Input [T, B, C, H, W]; output readout voltages [T, B, num_classes]. Stateless layers run once
    over the T·B-flattened tensor; each LIF layer runs the whole sequence in one call with the ``kernel`` chosen (see
    LIF), its torch backward steps compiled with torch.compile if ``compiled``.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        conv_channels: Sequence[int],
        kernel_sizes: Sequence[int],
        conv_scales: Sequence[float],
        pool_size: int,
        fc_features: Sequence[int],
        num_classes: int,
        readout_bias: bool,
        lif: LIFParameters,
        readout: LIParameters,
        compiled: bool = False,
        batch_norm: bool = False,
        fc_batch_norm: bool = False,
        dropout: float = 0.0,
        learn_tau_mem: bool = False,
        learn_v_th: bool = False,
        kernel: str = "auto",
    ) -> None:
        super().__init__()
        if not len(conv_channels) == len(kernel_sizes) == len(conv_scales):
            raise ValueError("conv_channels, kernel_sizes and conv_scales need one entry per conv layer")
        self.input_shape = tuple(input_shape)
        self.pool_size = pool_size
        self.conv_scales = list(conv_scales)
        channels = [input_shape[0], *conv_channels]
        self.convs = nn.ModuleList(
            nn.Conv2d(c_in, c_out, k) for c_in, c_out, k in zip(channels, channels[1:], kernel_sizes)
        )
        self.norms = nn.ModuleList(nn.BatchNorm2d(c) if batch_norm else nn.Identity() for c in conv_channels)
        self.conv_lifs = nn.ModuleList(LIF(lif, compiled, learn_tau_mem, learn_v_th, kernel) for _ in conv_channels)
        self.dropout = dropout
        features = [self._flat_features(), *fc_features]
        self.fcs = nn.ModuleList(nn.Linear(f_in, f_out) for f_in, f_out in zip(features, features[1:]))
        self.fc_norms = nn.ModuleList(nn.BatchNorm1d(f) if fc_batch_norm else nn.Identity() for f in fc_features)
        self.fc_lifs = nn.ModuleList(LIF(lif, compiled, learn_tau_mem, learn_v_th, kernel) for _ in fc_features)
        self.readout_linear = nn.Linear(features[-1], num_classes, bias=readout_bias)
        self.readout = LI(readout)

    def extra_repr(self) -> str:
        return (
            f"input_shape={self.input_shape}, conv_scales={self.conv_scales}, pool_size={self.pool_size}, "
            f"dropout={self.dropout}"
        )

    @classmethod
    def from_config(
        cls, model_cfg: ModelConfig, input_shape: Sequence[int], compiled: bool = False, kernel: str = "auto"
    ) -> ConvSNN:
        """Build from the ``model`` config node (see configs/model/); ``kernel`` is model.kernel when training (snn-eval
        chooses for its own device)."""
        lif = LIFParameters(surrogate=model_cfg.surrogate, **model_cfg.lif)
        readout = LIParameters(dt=model_cfg.lif.dt, **model_cfg.readout)
        return cls(
            input_shape=input_shape,
            conv_channels=list(model_cfg.conv_channels),
            kernel_sizes=list(model_cfg.kernel_sizes),
            conv_scales=list(model_cfg.conv_scales),
            pool_size=model_cfg.pool_size,
            fc_features=list(model_cfg.fc_features),
            num_classes=model_cfg.num_classes,
            readout_bias=model_cfg.readout_bias,
            lif=lif,
            readout=readout,
            compiled=compiled,
            batch_norm=model_cfg.batch_norm,
            fc_batch_norm=model_cfg.fc_batch_norm,
            dropout=model_cfg.dropout,
            learn_tau_mem=model_cfg.learn_tau_mem,
            learn_v_th=model_cfg.learn_v_th,
            kernel=kernel,
        )

    def _flat_features(self) -> int:
        c, h, w = self.input_shape
        for conv in self.convs:
            k = conv.kernel_size[0]
            h, w = (h - k + 1) // self.pool_size, (w - k + 1) // self.pool_size
            if h <= 0 or w <= 0:
                raise ValueError(f"input {tuple(self.input_shape)} is too small for the conv/pool stack")
            c = conv.out_channels
        return c * h * w

    def lif_layer_names(self) -> list[str]:
        """Names of the LIF layers, in order, as used for traces and logging."""
        return [f"conv{n + 1}" for n in range(len(self.convs))] + [f"fc{n + 1}" for n in range(len(self.fcs))]

    def synaptic_operations(self, trace: dict[str, LayerTrace]) -> dict[str, torch.Tensor]:
        """Per sample [B], in float64, for each LIF layer: the events it sends on times the synapses each event drives
        in the next weighted layer. The events are summed over the steps first, in float32 (exact: at most T per
        neuron), then in float64, so the one pass over the large tensor is the cheapest and every count is exact."""
        targets = [*self.convs[1:], *self.fcs, self.readout_linear]
        operations = {}
        for name, target in zip(self.lif_layer_names(), targets):
            events = trace[name].events
            per_neuron = events.float().sum(dim=0)  # [B, ...]: each neuron's events over the steps
            if isinstance(target, nn.Conv2d):
                per_position = per_neuron.sum(dim=1, dtype=torch.float64)  # [B, H, W]: over the channels
                fan_out = conv_fan_out(target, events.shape[-2:]).double()
                operations[name] = (per_position * fan_out).sum(dim=(1, 2))
            else:
                operations[name] = per_neuron.flatten(1).sum(dim=1, dtype=torch.float64) * target.out_features
        return operations

    def forward(
        self,
        x: torch.Tensor,
        trace: dict[str, LayerTrace] | None = None,
        record_voltage: bool = True,
        keep_spikes: bool = True,
    ) -> torch.Tensor:
        """Readout voltages [T, B, classes] for input [T, B, C, H, W]; fills ``trace`` if given (with the full spikes
        and the voltages as asked: ``LIF.forward``)."""
        h = x
        for n, (conv, norm, scale, lif) in enumerate(zip(self.convs, self.norms, self.conv_scales, self.conv_lifs)):
            currents = convolve_over_time(conv, norm, h, scale)
            h = lif(currents, trace, f"conv{n + 1}", record_voltage, self.pool_size, keep_spikes)
        h = h.flatten(2)
        for n, (fc, norm, lif) in enumerate(zip(self.fcs, self.fc_norms, self.fc_lifs)):
            currents = normalised_over_time(norm, fc(dropout_over_time(h, self.dropout, self.training)))
            h = lif(currents, trace, f"fc{n + 1}", record_voltage, keep_spikes=keep_spikes)
        return self.readout(self.readout_linear(dropout_over_time(h, self.dropout, self.training)))
