"""The thin Hydra entry points: compose the config, check it, hand it to train.fit or evaluation.evaluate_checkpoint."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import to_absolute_path
from omegaconf import DictConfig

from snn_train.config import ConfigError, validate, validate_eval
from snn_train.data import DataError
from snn_train.evaluation import CheckpointError, evaluate_checkpoint, format_report
from snn_train.train import fit


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def train(cfg: DictConfig) -> float:
    """Train the configured network; returns the final test accuracy (for sweepers that optimise it)."""
    try:
        validate(cfg)
        cfg.data.root = to_absolute_path(cfg.data.root)
        history = fit(cfg, Path(HydraConfig.get().runtime.output_dir))
    except (ConfigError, DataError) as error:
        print(f"snn-train: error: {error}", file=sys.stderr)
        sys.exit(2)
    return history[-1].test_accuracy


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
