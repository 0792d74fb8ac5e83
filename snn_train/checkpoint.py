"""Checkpoints: everything needed to continue a run exactly, the last two kept; the resume policy; atomic writes.

A checkpoint holds the model, optimizer and scheduler states, the moving average of the weights (train.ema_decay;
None when it is off), the resolved config, the random states, and under ``loop`` the training loop's own state (its
position, running sums and history, which progress.py defines). best.pt, the weights of the best validation (their
average, with train.ema_decay), holds only the model, the config and under ``loop`` that validation: enough for
snn-eval, not for resuming.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.optim.swa_utils import AveragedModel

from snn_train.errors import CheckpointError, ConfigError, write_error
from snn_train.schema import Config, flat_config

LAST, PREVIOUS, BEST = "last.pt", "previous.pt", "best.pt"
STATES = ("model", "optimizer", "scheduler", "average", "config", "rng")  # a checkpoint's keys besides ``loop``
REQUIRED = ("model", "config", "epoch", "step")  # what snn-eval needs (epoch and step in ``loop``)
RESUMABLE = (
    "optimizer",
    "scheduler",
    "rng",
    "batch",
    "history",
)  # what resuming needs too (batch, history in ``loop``)
# What may differ from a checkpoint's config when resuming it: how long to run, where and how to compute,
# log and evaluate, where the data lives. Everything else (network, T, data set, optimizer, seed, batches) must match.
CHANGEABLE_ON_RESUME = (
    "train.epochs",
    "train.resume",
    "train.device",
    "train.eval_batch_size",
    "train.checkpoint_every_n_steps",
    "train.on_nan",
    "train.early_stopping_patience",
    "train.test_on",
    "train.precision",
    "train.compile",
    "model.kernel",
    "log",
    "data.root",
    "data.download",
)

# Keys added to the config after checkpoints were written without them, with the value each such checkpoint was trained
# with (the option did not exist, so it was off): snn-eval, snn-export and resuming read them as if they were there.
ADDED_KEYS = {"model.fc_batch_norm": False}


def _sync_folder(folder: Path) -> None:
    """fsync a folder, so the renames in it are on disk."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _keep_as_previous(path: Path, previous: Path) -> None:
    """Make ``previous`` a second name of ``path`` (a copy where the file system has no hard links)."""
    temporary = previous.with_name(previous.name + ".tmp")
    temporary.unlink(missing_ok=True)
    try:
        os.link(path, temporary)
    except OSError:
        shutil.copyfile(path, temporary)
    os.replace(temporary, previous)


def write_atomically(path: Path, write: Callable[[BinaryIO], None], previous: Path | None = None) -> None:
    """Write through ``write`` into a temporary file beside ``path``, fsync it, rename it into place, fsync the folder;
    with ``previous``, the file ``path`` held is kept under that name, only once the new one is complete.

    ``path`` is always a complete file: the old one until the rename, the new one after. A write that fails (disk
    full, permissions, any OSError) raises CheckpointError and leaves no temporary file behind.
    """
    temporary = path.with_name(path.name + ".tmp")
    leftovers = [temporary] if previous is None else [temporary, previous.with_name(previous.name + ".tmp")]
    try:
        with temporary.open("wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if previous is not None and path.exists():
            _keep_as_previous(path, previous)
        os.replace(temporary, path)
        _sync_folder(path.parent)
    except OSError as error:
        for leftover in leftovers:
            with contextlib.suppress(OSError):
                leftover.unlink(missing_ok=True)
        raise write_error(path, error) from None


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
    average: AveragedModel | None,
    cfg: Config | DictConfig,
    data_order: torch.Tensor,
    loop: dict[str, Any],
) -> None:
    """Write folder/last.pt completely, then keep the one before as previous.pt; CheckpointError if it fails.

    ``model`` holds the trained weights; ``average``, with train.ema_decay, their moving average (parameters, buffers,
    and the count of updates, ``n_averaged``), so a resumed run goes on averaging exactly.

    ``data_order`` is the data-order generator's state at the start of the epoch ``loop`` is in;
    ``loop`` holds the loop's position and running sums (at least ``epoch`` and ``step``).
    """
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "average": average.state_dict() if average is not None else None,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "rng": rng_states(data_order),
        "loop": loop,
    }
    write_atomically(folder / LAST, lambda f: torch.save(state, f), previous=folder / PREVIOUS)


def save_best(folder: Path, model: nn.Module, cfg: Config | DictConfig, loop: dict[str, Any]) -> None:
    """Write folder/best.pt atomically: the weights, the config, and under ``loop`` the validation that made them the
    best (at least ``epoch`` and ``step``); CheckpointError if it fails."""
    state = {"model": model.state_dict(), "config": OmegaConf.to_container(cfg, resolve=True), "loop": loop}
    write_atomically(folder / BEST, lambda f: torch.save(state, f))


def _missing(state: Any, keys: tuple[str, ...]) -> list[str]:
    """Those of ``keys`` that ``state`` lacks, at its top level or (for the loop's) under ``loop``."""
    if not isinstance(state, dict):
        return list(keys)
    loop = state.get("loop", {})
    return [key for key in keys if key not in state and key not in loop]


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by save_checkpoint; CheckpointError with the reason if it is unreadable.

    One written before the loop's state had its own key has it at the top level: it is moved under ``loop``.
    """
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch.load fails in many ways on a damaged file: each means "unreadable"
        reason = " ".join(str(error).split()) or type(error).__name__
        raise CheckpointError(f"{path} is not a readable checkpoint ({reason[:200]})") from None
    if isinstance(state, dict) and "loop" not in state:
        loop = {key: value for key, value in state.items() if key not in STATES}
        state = {**{key: state[key] for key in STATES if key in state}, "loop": loop}
    missing = _missing(state, REQUIRED)
    if missing:
        raise CheckpointError(f"{path} is not an snn-train checkpoint (it lacks {', '.join(missing)})")
    return state


def evaluated_weights(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights snn-eval and snn-export take from a checkpoint: the average of the weights where last.pt keeps one
    (train.ema_decay), as training evaluated, else ``model`` (best.pt's is the average already)."""
    average = state.get("average")
    if average is None:
        return state["model"]
    return {key.removeprefix("module."): value for key, value in average.items() if key != "n_averaged"}


def find_checkpoint(path: Path, names: tuple[str, ...] = (LAST,)) -> Path:
    """The checkpoint file given, or the first of ``names`` a run folder holds in checkpoints/ (by default its
    newest, last.pt)."""
    candidates = [path / "checkpoints" / name for name in names] if path.is_dir() else [path]
    file = next((candidate for candidate in candidates if candidate.is_file()), candidates[-1])
    if not file.is_file():
        holding = " or ".join(f"checkpoints/{name}" for name in names)
        raise CheckpointError(f"no checkpoint at {file}; give a checkpoint file or a run folder holding {holding}")
    return file


def resume_differences(saved: dict[str, Any], cfg: Config | DictConfig) -> list[str]:
    """``key (saved → now)`` for each key a checkpoint depends on whose value ``cfg`` changes."""
    old, new = {**ADDED_KEYS, **flat_config(saved)}, flat_config(cfg)
    changeable = tuple(f"{key}." for key in CHANGEABLE_ON_RESUME)
    return [
        f"{key} ({old.get(key, 'absent')} → {new.get(key, 'absent')})"
        for key in sorted(old.keys() | new.keys())
        if old.get(key) != new.get(key) and not f"{key}.".startswith(changeable)
    ]


def load_for_resume(cfg: Config | DictConfig) -> tuple[Path, dict[str, Any]]:
    """Read ``train.resume``'s checkpoint and refuse it if ``cfg`` changes what it depends on."""
    path = find_checkpoint(Path(cfg.train.resume))
    try:
        state = load_checkpoint(path)
    except CheckpointError as error:
        if path.name != LAST or not path.with_name(PREVIOUS).is_file():
            raise
        raise CheckpointError(
            f"{error}; train.resume={path.with_name(PREVIOUS)} continues from the one before"
        ) from None
    missing = _missing(state, RESUMABLE)
    if missing:
        raise CheckpointError(
            f"{path} cannot be resumed: it lacks {', '.join(missing)} (written by an snn-train that could not resume)"
        )
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
    average: AveragedModel | None,
    data_order: torch.Generator,
) -> None:
    """Put a checkpoint's weights, optimizer and scheduler states, the average of the weights and every random state
    back. (A checkpoint holds an average exactly when its config's train.ema_decay is set, which must match.)"""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    if average is not None:
        average.load_state_dict(state["average"])
    rng = state["rng"]
    data_order.set_state(rng["data_order"])
    random.setstate(rng["python"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
