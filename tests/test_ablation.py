"""scripts/ablation.py: runs each variant on top of the base and tabulates what each run's metrics.json says."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # each test starts snn-train (or a script) as a process

ROOT = Path(__file__).parents[1]


def ablation(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "ablation.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_ablation_table_reports_each_variants_metrics(tmp_path: Path, tiny_overrides: list[str]) -> None:
    base = " ".join([*tiny_overrides, "train.limit_batches=2", "seq_length=4", "data.val_size=20"])
    result = ablation(
        ["--out", "grid", "--test", "--base", base, "seq_length=3", "model.batch_norm=true train.epochs=2"], tmp_path
    )
    assert result.returncode == 0, result.stderr
    table = (tmp_path / "grid" / "ablation.md").read_text()
    assert result.stdout == table
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row[0] for row in rows] == ["| base", "| `seq_length=3`", "| `model.batch_norm=true train.epochs=2`"]
    validation = []
    for n, row in enumerate(rows):
        final = json.loads((tmp_path / "grid" / f"{n}_seed0" / "metrics.json").read_text())["final"]
        validation.append(final["best_val_accuracy"])
        assert row[1] == f"{100 * final['best_val_accuracy']:.2f} %"
        assert row[2] == f"{100 * final['test_accuracy']:.2f} %"
        assert row[7] == f"{final['test_spikes_per_sample']:.0f}"
        assert row[5] == str(final["epoch"])
    assert [row[4] for row in rows] == ["4", "3", "4"] and [row[5] for row in rows] == ["1", "1", "2"]
    assert rows[0][3] == "" and rows[1][3] == f"{100 * (validation[1] - validation[0]):+.2f}"  # chosen on validation


def test_seeds_are_averaged_and_the_test_stays_out_unless_asked(tmp_path: Path, tiny_overrides: list[str]) -> None:
    base = " ".join([*tiny_overrides, "train.limit_batches=2", "data.val_size=20"])
    result = ablation(["--out", "grid", "--seeds", "0", "1", "--base", base], tmp_path)
    assert result.returncode == 0, result.stderr
    header, _, row = [line for line in result.stdout.splitlines() if line.startswith("|")]
    assert "test" not in header
    accuracies = [
        json.loads((tmp_path / "grid" / f"0_seed{seed}" / "metrics.json").read_text())["final"]["best_val_accuracy"]
        for seed in (0, 1)
    ]
    mean, spread = 50 * sum(accuracies), 50 * abs(accuracies[0] - accuracies[1])
    each = ", ".join(f"{100 * a:.2f}" for a in accuracies)
    assert row.split(" | ")[1] == f"{mean:.2f} ± {spread:.2f} % ({each})"
    assert row.endswith(" | 2 |")


def test_a_failing_variant_stops_the_grid_and_names_its_log(tmp_path: Path, tiny_overrides: list[str]) -> None:
    result = ablation(["--out", "grid", "--base", " ".join(tiny_overrides), "model.dropout=2"], tmp_path)
    assert result.returncode != 0
    assert "model.dropout=2" in result.stderr and str(Path("grid") / "1_seed0.log") in result.stderr
    assert "model.dropout is a probability" in (tmp_path / "grid" / "1_seed0.log").read_text()


def ablation_module():
    """scripts/ablation.py imported as a module (it imports summarize_sweep from its own folder)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        return importlib.import_module("ablation")
    finally:
        sys.path.remove(str(ROOT / "scripts"))


def runs(val: list[float], test: list[float]) -> list[dict[str, object]]:
    """What ablation.run returns for each seed, with these validation and test accuracies."""
    return [
        {
            "val_accuracy": v,
            "test_accuracy": t,
            "seq_length": 4,
            "epochs": 1,
            "process_wall_s": 10.0,
            "spikes_per_sample": 100.0,
        }
        for v, t in zip(val, test, strict=True)
    ]


def test_delta_is_taken_on_validation_and_seeds_show_mean_and_half_their_range() -> None:
    ablation = ablation_module()
    base = runs([0.980, 0.984], [0.990, 0.990])
    variant = runs([0.990, 0.986], [0.985, 0.983])  # better on validation, worse on test
    row = ablation.variant_row("optim.lr=4e-3", variant, base)
    assert row["Δ vs base"] == "+0.60"  # (0.988 - 0.982), not the test's -0.60
    assert row["val accuracy"] == "98.80 ± 0.20 % (99.00, 98.60)"
    assert row["test accuracy"] == "98.40 ± 0.10 % (98.50, 98.30)"
    unsplit = runs(["", ""], [0.990, 0.986])  # no validation split: the test decides
    assert ablation.variant_row("x=1", unsplit, runs(["", ""], [0.980, 0.980]))["Δ vs base"] == "+0.80"
    table = ablation.markdown("base", [ablation.variant_row("", base, None), row], test=False)
    assert "test" not in table and "98.80 ± 0.20 %" in table
    assert "98.40 ± 0.10 %" in ablation.markdown("base", [row], test=True)
