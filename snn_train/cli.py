"""The thin Hydra entry points: compose the config, check it, hand it to train.fit or evaluation.evaluate_checkpoint."""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path
from typing import NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from hydra.utils import to_absolute_path
from omegaconf import DictConfig

from snn_train import distributed
from snn_train.checkpoint import CheckpointError
from snn_train.config import ConfigError, validate, validate_eval
from snn_train.data import DataError
from snn_train.evaluation import evaluate_checkpoint, format_report
from snn_train.train import Interrupted, TrainingError, fit


def fail(message: str) -> NoReturn:
    """Exit 2 with one line on stderr: the convention for errors a user can cause and fix."""
    print(f"snn-train: error: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(2)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def run(cfg: DictConfig) -> float:
    """Train the configured network; returns the final test accuracy (for sweepers that optimise it).

    Each process of a distributed run (torchrun, or a submitit job of several tasks) runs this in the same run folder.
    """
    try:
        validate(cfg)
        cfg.data.root = to_absolute_path(cfg.data.root)
        if cfg.train.resume is not None:
            cfg.train.resume = to_absolute_path(cfg.train.resume)
        with distributed.process_group():
            if not distributed.is_main():
                logging.getLogger().handlers.clear()  # rank 0 logs the run, to the console and cli.log
            history = fit(cfg, Path(HydraConfig.get().runtime.output_dir))
    except (ConfigError, DataError, CheckpointError, TrainingError) as error:
        fail(str(error))
    except Interrupted as stop:
        print(f"snn-train: {stop}", file=sys.stderr)
        sys.exit(128 + stop.signum)
    return history[-1].test_accuracy


def hydra_message(error: HydraException) -> str:
    """Hydra's message without its layout: first lines of it and of its cause, and the options it lists."""
    message = str(error).strip().splitlines()[0].rstrip(".")
    if isinstance(error, OverrideParseException):
        message = f"cannot parse override {error.override!r}: {message}"
    if error.__cause__ is not None and str(error.__cause__).strip():
        message += f": {str(error.__cause__).strip().splitlines()[0]}"
    if isinstance(error, MissingConfigException) and error.options:
        message += f" (options: {', '.join(error.options)})"
    return message


def raised_in_hydra(error: BaseException) -> bool:
    """Whether ``error`` was raised in Hydra's code: it reports some bad overrides (``data=0``) as a ValueError."""
    frame = error.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    return frame is not None and frame.tb_frame.f_globals.get("__name__", "").startswith("hydra.")


def train() -> None:
    """``snn-train``: run the Hydra app, with Hydra's own errors (bad overrides, a run folder it cannot create) in one line too."""
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises its errors to us instead of printing them with a stack trace
    try:
        with distributed.process_group():  # under torchrun: before Hydra, which names the run folder after rank 0's clock
            if not distributed.is_main():
                sys.argv.append("hydra.output_subdir=null")  # rank 0 writes .hydra/
            run()
    except HydraException as error:
        fail(hydra_message(error))
    except OSError as error:
        fail(f"{error.strerror or error}: {error.filename}" if error.filename else str(error))
    except ValueError as error:
        if not raised_in_hydra(error):
            raise
        fail(str(error))
    except KeyboardInterrupt:
        print("snn-train: interrupted before training started", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def evaluate(cfg: DictConfig) -> float:
    """Evaluate a checkpoint, print the report and write it as eval.json beside the checkpoint; returns the accuracy."""
    try:
        validate_eval(cfg)
        cfg.checkpoint = to_absolute_path(cfg.checkpoint)
        if cfg.data is not None:
            cfg.data.root = to_absolute_path(cfg.data.root)
        report = evaluate_checkpoint(cfg)
    except (ConfigError, DataError, CheckpointError) as error:
        print(f"snn-eval: error: {error}", file=sys.stderr)
        sys.exit(2)
    print(format_report(report))
    return report["accuracy"]
