"""Collect every finished job of a ``snn-train -m`` sweep into one table sorted by validation accuracy.

Each row has the job's best validation accuracy and loss (empty without a validation split), and its test figures:
one evaluation at the end, of the weights ``test_on`` names (best or last). Jobs without a validation split sort
by test accuracy, after those with one.

Usage: python scripts/summarize_sweep.py outputs/multirun/<date>/<time> [--markdown | --csv]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import yaml

COLUMNS = (
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
    "train_accuracy",
    "samples_per_s",
    "wall_s",
)


def rounded(value: float | None, digits: int) -> float | str:
    return "" if value is None else round(value, digits)


def job_row(job_dir: Path) -> dict[str, object] | None:
    """One job's overrides, T, epochs and final metrics; None for a job that has not finished."""
    final = json.loads((job_dir / "metrics.json").read_text())["final"]
    if final is None:
        return None
    overrides = yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text()) or []
    config = yaml.safe_load((job_dir / ".hydra" / "config.yaml").read_text())
    return {
        "overrides": " ".join(overrides),
        "seq_length": config["seq_length"],
        "epochs": final["epoch"],
        "steps": final["step"],
        "val_accuracy": rounded(final["best_val_accuracy"], 4),
        "val_loss": rounded(final["best_val_loss"], 4),
        "test_accuracy": round(final["test_accuracy"], 4),
        "test_loss": round(final["test_loss"], 4),
        "test_on": final["test_on"],
        "spikes_per_sample": round(final["test_spikes_per_sample"], 1),
        "train_accuracy": round(final["train_accuracy"], 4),
        "samples_per_s": round(final["samples_per_s"], 1),
        "wall_s": round(final["wall_s"], 1),
    }


def rank(row: dict[str, object]) -> tuple[bool, float]:
    """The sort key: jobs with a validation split first, by validation accuracy; the others by test accuracy."""
    validated = row["val_accuracy"] != ""
    return validated, float(row["val_accuracy"] if validated else row["test_accuracy"])


def collect(sweep_dir: Path) -> list[dict[str, object]]:
    rows = [row for path in sweep_dir.rglob("metrics.json") if (row := job_row(path.parent)) is not None]
    return sorted(rows, key=rank, reverse=True)


def print_markdown(rows: list[dict[str, object]]) -> None:
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for row in rows:
        print("| " + " | ".join(f"`{row[c]}`" if c == "overrides" else str(row[c]) for c in COLUMNS) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path)
    form = parser.add_mutually_exclusive_group()
    form.add_argument("--markdown", action="store_true", help="a Markdown table")
    form.add_argument("--csv", action="store_true", help="CSV")
    args = parser.parse_args()
    rows = collect(args.sweep_dir)
    if not rows:
        sys.exit(f"no finished job's metrics.json below {args.sweep_dir}")
    if args.markdown:
        print_markdown(rows)
    elif args.csv:
        writer = csv.DictWriter(sys.stdout, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    else:
        print("  ".join(f"{c:>8}" for c in COLUMNS[1:]) + "  overrides")
        for row in rows:
            print("  ".join(f"{row[c]!s:>8}" for c in COLUMNS[1:]) + f"  {row['overrides']}")


if __name__ == "__main__":
    main()
