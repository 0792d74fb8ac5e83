"""Encoders: images with values in [0, 1] ([B, C, H, W]), or event frames ([B, T, C, H, W]), into input sequences
[T, B, C, H, W]."""

from __future__ import annotations

import torch
from torch import nn

from snn_train.neurons import leaky_integrate
from snn_train.schema import EncoderConfig


class DirectEncoder(nn.Module):
    """The scaled image as input current at every time step."""

    def __init__(self, seq_length: int, input_scale: float) -> None:
        super().__init__()
        self.seq_length = seq_length
        self.input_scale = input_scale

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images * self.input_scale).expand(self.seq_length, *images.shape)

    def extra_repr(self) -> str:
        return f"seq_length={self.seq_length}, input_scale={self.input_scale}"


class PoissonEncoder(nn.Module):
    """Rate code: a spike with probability f_max·dt·x at each step, scaled by input_scale."""

    def __init__(self, seq_length: int, input_scale: float, f_max: float, dt: float) -> None:
        super().__init__()
        self.seq_length = seq_length
        self.input_scale = input_scale
        self.f_max = f_max
        self.dt = dt

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        probability = (self.f_max * self.dt * images).clamp(0.0, 1.0)
        noise = torch.rand((self.seq_length, *images.shape), device=images.device)
        return (noise < probability).to(images.dtype) * self.input_scale

    def extra_repr(self) -> str:
        return f"seq_length={self.seq_length}, f_max={self.f_max}, dt={self.dt}, input_scale={self.input_scale}"


class LatencyEncoder(nn.Module):
    """Time-to-first-spike: each pixel with x > 0 spikes once, at step round((1 - x)·(T - 1)).

    Black pixels (x = 0) have infinite latency and stay silent, as background should.
    """

    def __init__(self, seq_length: int, input_scale: float) -> None:
        super().__init__()
        self.seq_length = seq_length
        self.input_scale = input_scale

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        spike_step = torch.round((1.0 - images.clamp(0.0, 1.0)) * (self.seq_length - 1))
        steps = torch.arange(self.seq_length, device=images.device, dtype=images.dtype)
        steps = steps.view(-1, *([1] * images.dim()))
        return ((steps == spike_step) & (images > 0)).to(images.dtype) * self.input_scale

    def extra_repr(self) -> str:
        return f"seq_length={self.seq_length}, input_scale={self.input_scale}"


class ConstantCurrentEncoder(nn.Module):
    """A LIF neuron per pixel driven by the constant current input_scale·x (Norse's current encoder).

    Per step: v ← v + dt·τm⁻¹·(v_leak − v + I); z = Θ(v − v_th); v ← v − z·(v − v_reset).
    """

    def __init__(
        self,
        seq_length: int,
        input_scale: float,
        tau_mem_inv: float,
        v_leak: float,
        v_th: float,
        v_reset: float,
        dt: float,
    ) -> None:
        super().__init__()
        self.seq_length = seq_length
        self.input_scale = input_scale
        self.tau_mem_inv = tau_mem_inv
        self.v_leak = v_leak
        self.v_th = v_th
        self.v_reset = v_reset
        self.dt = dt

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        current = images * self.input_scale
        v = torch.full_like(current, self.v_leak)
        spikes = []
        for _ in range(self.seq_length):
            v = leaky_integrate(v, current, self.dt, self.tau_mem_inv, self.v_leak)  # v ← v + dt·τm⁻¹·(v_leak − v + I)
            z = (v > self.v_th).to(current.dtype)  # z = Θ(v − v_th)
            v = v - z * (v - self.v_reset)  # v ← v − z·(v − v_reset)
            spikes.append(z)
        return torch.stack(spikes)

    def extra_repr(self) -> str:
        return (
            f"seq_length={self.seq_length}, input_scale={self.input_scale}, tau_mem_inv={self.tau_mem_inv}, "
            f"v_leak={self.v_leak}, v_th={self.v_th}, v_reset={self.v_reset}, dt={self.dt}"
        )


class EventsEncoder(nn.Module):
    """Event frames as input spikes: frame t of a sample is the input at step t, its counts clipped to 1 (a pixel with
    events spikes once) if ``clip``, else kept, times input_scale."""

    def __init__(self, seq_length: int, input_scale: float, clip: bool) -> None:
        super().__init__()
        self.seq_length = seq_length
        self.input_scale = input_scale
        self.clip = clip

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        spikes = frames.clamp(max=1.0) if self.clip else frames
        return spikes.transpose(0, 1) * self.input_scale

    def extra_repr(self) -> str:
        return f"seq_length={self.seq_length}, input_scale={self.input_scale}, clip={self.clip}"


ENCODERS: dict[str, type[nn.Module]] = {  # encoder.name → class; its config is configs/encoder/<name>.yaml
    "direct": DirectEncoder,
    "poisson": PoissonEncoder,
    "latency": LatencyEncoder,
    "constant_current": ConstantCurrentEncoder,
    "events": EventsEncoder,
}
EVENT_ENCODERS = ("events",)  # the encoders that take event frames (event data sets); the others take images


def build_encoder(encoder_cfg: EncoderConfig, seq_length: int) -> nn.Module:
    """The encoder named by ``encoder_cfg.name``, with the rest of its config as arguments."""
    kwargs = {key: value for key, value in encoder_cfg.items() if key != "name"}
    return ENCODERS[encoder_cfg.name](seq_length=seq_length, **kwargs)
