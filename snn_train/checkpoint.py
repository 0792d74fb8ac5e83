"""Checkpoints: everything needed to continue a run exactly, written atomically, the last two kept."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from snn_train.config import CHANGEABLE_ON_RESUME, ConfigError, resume_differences

LAST, PREVIOUS = "last.pt", "previous.pt"
CHECKPOINT_KEYS = ("model", "config", "epoch", "step")  # what snn-eval needs; resuming needs RESUME_KEYS too
RESUME_KEYS = ("optimizer", "scheduler", "rng", "batch", "history")


class CheckpointError(RuntimeError):
    """A checkpoint or run folder that cannot be written or read; the message names the path and the reason."""


def write_atomically(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write through ``write`` into a temporary file beside ``path``, fsync it, rename it into place, fsync the folder."""
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def check_writable(*folders: Path) -> None:
    """Create each folder and a file in it, so an unwritable run folder is reported before training starts."""
    for folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as error:
            raise CheckpointError(f"cannot write to the run folder {folder} ({error.strerror or error})") from None


def rng_states(data_order: torch.Tensor) -> dict[str, Any]:
    """The data-order generator state given, and Python's, torch's (and CUDA's when present) random states."""
    states: dict[str, Any] = {"data_order": data_order, "python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def save_checkpoint(
    folder: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    cfg: DictConfig,
    data_order: torch.Tensor,
    progress: dict[str, Any],
) -> None:
    """Write folder/last.pt atomically after moving the one before to previous.pt.

    ``data_order`` is the data-order generator's state at the start of the epoch ``progress`` is in;
    ``progress`` holds the loop's position and running sums (at least ``step``).
    """
    folder.mkdir(parents=True, exist_ok=True)
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "rng": rng_states(data_order),
        **progress,
    }
    last = folder / LAST
    if last.exists():
        os.replace(last, folder / PREVIOUS)
    write_atomically(last, lambda f: torch.save(state, f))


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by save_checkpoint; CheckpointError with the reason if it is unreadable."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch.load fails in many ways on a damaged file: each means "unreadable"
        reason = " ".join(str(error).split()) or type(error).__name__
        raise CheckpointError(f"{path} is not a readable checkpoint ({reason[:200]})") from None
    missing = [key for key in CHECKPOINT_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise CheckpointError(f"{path} is not an snn-train checkpoint (it lacks {', '.join(missing)})")
    return state


def find_checkpoint(path: Path) -> Path:
    """The checkpoint file given, or a run folder's newest: checkpoints/last.pt (previous.pt if it died replacing it)."""
    file = path
    if path.is_dir():
        candidates = [path / "checkpoints" / name for name in (LAST, PREVIOUS)]
        file = next((candidate for candidate in candidates if candidate.is_file()), candidates[0])
    if not file.is_file():
        raise CheckpointError(f"no checkpoint at {file}; give a checkpoint file or a run folder holding checkpoints/{LAST}")
    return file


def load_for_resume(cfg: DictConfig) -> tuple[Path, dict[str, Any]]:
    """Read ``train.resume``'s checkpoint and refuse it if ``cfg`` changes what it depends on."""
    path = find_checkpoint(Path(cfg.train.resume))
    try:
        state = load_checkpoint(path)
    except CheckpointError as error:
        if path.name != LAST or not path.with_name(PREVIOUS).is_file():
            raise
        raise CheckpointError(f"{error}; train.resume={path.with_name(PREVIOUS)} continues from the one before") from None
    missing = [key for key in RESUME_KEYS if key not in state]
    if missing:
        raise CheckpointError(f"{path} cannot be resumed: it lacks {', '.join(missing)} (written by an snn-train that could not resume)")
    differences = resume_differences(state["config"], cfg)
    if differences:
        raise ConfigError(
            f"train.resume: {path} was trained with a different config: {'; '.join(differences)}; "
            f"run the original command with train.resume added (only {', '.join(CHANGEABLE_ON_RESUME)} may change)"
        )
    return path, state


def restore(
    state: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    data_order: torch.Generator,
) -> None:
    """Put a checkpoint's weights, optimizer and scheduler states and every random state back."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    rng = state["rng"]
    data_order.set_state(rng["data_order"])
    random.setstate(rng["python"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
