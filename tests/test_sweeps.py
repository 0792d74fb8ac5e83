"""Sweeps through Hydra's plugins (the sweep and slurm extras): joblib in parallel, the Optuna preset, the SLURM
preset."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from snn_train.config import compose

pytestmark = pytest.mark.slow  # each test starts snn-train (or a script) as a process

ROOT = Path(__file__).parents[1]
SEARCHED = ("optim.lr", "model.lif.alpha", "model.lif.v_th", "encoder.input_scale")


def snn_train(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["snn-train", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def job_dirs(outputs: Path) -> list[Path]:
    return sorted(path.parent for path in outputs.rglob("metrics.json"))


def test_joblib_launcher_runs_a_two_job_sweep(tmp_path: Path, tiny_overrides: list[str]) -> None:
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    result = snn_train(
        [
            "-m",
            "hydra/launcher=joblib",
            "hydra.launcher.n_jobs=2",
            "model=super,tanh",
            *tiny_overrides,
            "train.limit_batches=1",
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    jobs = job_dirs(tmp_path / "outputs" / "multirun")
    assert [job.name for job in jobs] == ["0", "1"]
    for job, surrogate in zip(jobs, ("super", "tanh")):
        hydra = yaml.safe_load((job / ".hydra" / "hydra.yaml").read_text())["hydra"]
        assert hydra["launcher"]["_target_"].endswith("JoblibLauncher") and hydra["launcher"]["n_jobs"] == 2
        assert yaml.safe_load((job / ".hydra" / "config.yaml").read_text())["model"]["surrogate"] == surrogate


def test_optuna_preset_searches_and_maximises_the_best_validation_accuracy(
    tmp_path: Path, tiny_overrides: list[str]
) -> None:
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    # 30 validation images (3 per class) and 48 test images: a validation accuracy is a multiple of 1/30, a test
    # accuracy of 1/48, so the value Optuna keeps tells which one it was given.
    overrides = [*tiny_overrides, "train.limit_batches=2", "data.val_size=30", "decoder=mean"]
    result = snn_train(["hparams_search=optuna", "hydra.sweeper.n_trials=2", *overrides], tmp_path)
    assert result.returncode == 0, result.stderr
    jobs = job_dirs(tmp_path / "outputs" / "multirun")
    assert [job.name for job in jobs] == ["0", "1"]
    finals = []
    for job in jobs:
        overrides = dict(o.split("=", 1) for o in yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()))
        config = yaml.safe_load((job / ".hydra" / "config.yaml").read_text())
        assert config["seq_length"] == 4  # fixed on the command line, so not searched
        assert float(overrides["optim.lr"]) == config["optim"]["lr"] and 3e-4 <= config["optim"]["lr"] <= 1e-2
        assert (
            float(overrides["model.lif.v_th"]) == config["model"]["lif"]["v_th"]
            and 0.5 <= config["model"]["lif"]["v_th"] <= 2.0
        )
        finals.append(json.loads((job / "metrics.json").read_text())["final"])
    results = yaml.safe_load((jobs[0].parent / "optimization_results.yaml").read_text())
    best = max(final["best_val_accuracy"] for final in finals)
    assert results["best_value"] == pytest.approx(best)
    assert best * 30 == pytest.approx(round(best * 30)) and all(final["test_accuracy"] != best for final in finals)
    assert set(results["best_params"]) == set(SEARCHED)

    summary = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "summarize_sweep.py"), str(jobs[0].parent), "--markdown"],
        capture_output=True,
        text=True,
        check=True,
    )
    header, rule, *rows = summary.stdout.splitlines()
    columns = header.strip("| ").split(" | ")
    assert columns[:10] == [
        "overrides",
        "seq_length",
        "epochs",
        "steps",
        "val_accuracy",
        "val_loss",
        "test_accuracy",
        "test_loss",
        "test_on",
        "spikes_per_sample",
    ]
    cells = [dict(zip(columns, row.strip("| ").split(" | "), strict=True)) for row in rows]
    assert len(cells) == 2 and all(
        "optim.lr=" in c["overrides"] and "hparams_search=optuna" in c["overrides"] for c in cells
    )
    assert float(cells[0]["val_accuracy"]) == round(best, 4)  # the best validation first
    assert sorted((c["epochs"], c["val_accuracy"], c["spikes_per_sample"]) for c in cells) == sorted(
        (str(final["epoch"]), str(round(final["best_val_accuracy"], 4)), str(round(final["test_spikes_per_sample"], 1)))
        for final in finals
    )


def test_slurm_preset_takes_partition_gpus_and_time_limit_as_overrides() -> None:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    overrides = [
        "hydra/launcher=slurm",
        "hydra.launcher.partition=gpu",
        "hydra.launcher.gpus_per_node=4",
        "hydra.launcher.timeout_min=30",
    ]
    cfg = compose("config", overrides, return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.partition, launcher.gpus_per_node, launcher.timeout_min, launcher.nodes) == ("gpu", 4, 30, 1)
