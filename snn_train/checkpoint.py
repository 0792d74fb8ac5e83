"""Checkpoints: everything needed to inspect or continue a run, written atomically."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn


def write_atomically(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write through ``write`` into a temporary file beside ``path``, fsync it, then rename it into place."""
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def rng_states(data_order: torch.Generator) -> dict[str, Any]:
    """The data-order generator's, Python's and torch's random states (and CUDA's when present)."""
    states: dict[str, Any] = {"data_order": data_order.get_state(), "python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def save_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    epoch: int,
    step: int,
    cfg: DictConfig,
    data_order: torch.Generator,
) -> None:
    """Write the checkpoint atomically: a reader sees the previous one or this one, never a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "epoch": epoch,
        "step": step,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "rng": rng_states(data_order),
    }
    write_atomically(path, lambda f: torch.save(state, f))


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by save_checkpoint."""
    return torch.load(path, map_location=map_location, weights_only=False)
