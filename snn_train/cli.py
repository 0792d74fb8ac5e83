"""The thin Hydra entry points: compose the config, check it, hand it to train.fit, report.evaluate_checkpoint or
export.export_checkpoint.

Each entry point runs its ``@hydra.main`` app through ``app.run_app``, which reports every error a user can cause
as one line ``<command>: error: …`` with exit code 2. The work's modules are imported inside the apps, once Hydra
has composed a config: ``--help`` and each TAB of shell completion start without them, and without torch.
"""

from __future__ import annotations

import logging
import os
import sys
from importlib import import_module
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import to_absolute_path
from omegaconf import OmegaConf

from snn_train.app import run_app
from snn_train.errors import reported
from snn_train.launch import several_processes
from snn_train.schema import Config, EvalConfig, ExportConfig


def user_path(path: str) -> str:
    """A path as the user typed it, relative to the folder they ran the command in, made absolute and normalised:
    ``../shared/data`` typed in /work/main is /work/shared/data in the run's config and the reports."""
    return os.path.normpath(to_absolute_path(path))


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def run(cfg: Config) -> float:
    """Train the configured network; returns the best validation accuracy, or without a validation split
    (data.val_size=0) the test accuracy, for sweepers that optimise it.

    Each process of a distributed run (torchrun, or a submitit job of several tasks) runs this in the same run folder.
    """
    from snn_train import distributed
    from snn_train.config import validate

    with reported("snn-train"):
        validate(cfg)
        from snn_train.train import fit  # the training code once the config is checked: a bad value is told sooner

        cfg.data.root = user_path(cfg.data.root)
        if cfg.train.resume is not None:
            cfg.train.resume = user_path(cfg.train.resume)
        with distributed.process_group():
            if not distributed.is_main():
                logging.getLogger().handlers.clear()  # rank 0 logs the run, to the console and cli.log
            final = fit(cfg, Path(HydraConfig.get().runtime.output_dir)).final
    return final.best_val_accuracy if final.best_val_accuracy is not None else final.test_accuracy


def run_distributed() -> None:
    """``run`` in the process group, joined before Hydra starts: Hydra names the run folder after rank 0's clock. A
    single process goes straight to Hydra, without torch until a config is composed (``--help``, TAB completion)."""
    if not several_processes():
        run()
        return
    from snn_train import distributed

    # The training code and torchvision (torch._dynamo with it) before the group is joined, as ranks always started:
    # imported once the group was up, a rank aborted now and then at exit ("terminate called without an active
    # exception", about 1 run in 12 of tests/test_nmnist.py's torchrun test). A single process imports torchvision
    # only to load an image data set, once its config is checked.
    import_module("snn_train.train")
    import_module("torchvision")
    with distributed.process_group():
        if not distributed.is_main():
            sys.argv.append("hydra.output_subdir=null")  # rank 0 writes .hydra/
        run()


def train() -> None:
    """``snn-train``: run the training app."""
    run_app("snn-train", run_distributed)


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def run_eval(cfg: EvalConfig) -> float:
    """Evaluate a checkpoint, print the report and write it as eval.json beside the checkpoint; returns the accuracy."""
    from snn_train.config import validate_eval

    with reported("snn-eval"):
        validate_eval(cfg)
        from snn_train.report import evaluate_checkpoint, format_report  # once the config is checked, as in run

        cfg.checkpoint = user_path(cfg.checkpoint)
        if not OmegaConf.is_missing(cfg.data, "root"):
            cfg.data.root = user_path(cfg.data.root)
        report = evaluate_checkpoint(cfg)
    print(format_report(report))
    return report["accuracy"]


def evaluate() -> None:
    """``snn-eval``: run the evaluation app."""
    run_app("snn-eval", run_eval)


@hydra.main(version_base="1.3", config_path="conf", config_name="export")
def run_export(cfg: ExportConfig) -> None:
    """Write a checkpoint's network as a NIR graph (model.nir beside it by default) and print what went where."""
    from snn_train.config import validate_export

    with reported("snn-export"):
        validate_export(cfg)
        from snn_train.export import export_checkpoint  # once the config is checked, as in run
        from snn_train.export import format_report as format_export_report

        cfg.checkpoint = user_path(cfg.checkpoint)
        if cfg.out is not None:
            cfg.out = user_path(cfg.out)
        report = export_checkpoint(cfg)
    print(format_export_report(report))


def export() -> None:
    """``snn-export``: run the export app."""
    run_app("snn-export", run_export)
