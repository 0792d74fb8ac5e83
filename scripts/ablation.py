"""Run an ablation grid with snn-train and write a Markdown table: best validation accuracy, T, epochs, wall time,
spikes per sample, and with ``--test`` the test accuracy.

Each variant is a set of overrides applied on top of ``--base``; the base itself is the first row. Every variant runs
once per seed, one after another (so wall times are comparable), each as its own ``snn-train`` process. With a
validation split the difference to the base (``Δ vs base``) is taken on validation accuracy, so a grid that chooses
settings never needs the test set: leave ``--test`` off while choosing, and run the chosen configuration with it.
Several seeds show as mean ± spread (half the range) and each seed's value.

Usage: python scripts/ablation.py --out DIR --base "+experiment=fast data.root=../shared/data" \\
           "model.batch_norm=false" "augment.shift=0 augment.rotate=0 augment.scale=0" [--seeds 0 1 2] [--test]
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from summarize_sweep import job_row

COLUMNS = ("variant", "val accuracy", "test accuracy", "Δ vs base", "T", "epochs", "wall s", "spikes/sample", "seeds")
SELECTION = ("val_accuracy", "test_accuracy")  # the accuracy Δ is taken on: validation where the runs have it


def run(out: Path, name: str, overrides: list[str]) -> dict[str, object]:
    """One snn-train run in ``out/name``; its final metrics and the wall time of the whole process."""
    run_dir = out / name
    command = ["snn-train", *overrides, f"hydra.run.dir={run_dir}", "log.progress_bar=false"]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    wall_s = time.perf_counter() - started
    (out / f"{name}.log").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        sys.exit(f"{shlex.join(command)} failed (exit {result.returncode}); see {out / f'{name}.log'}")
    return {**job_row(run_dir), "process_wall_s": wall_s}


def selection_key(runs: list[dict[str, object]]) -> str:
    """The metric variants are compared on: best validation accuracy, or test accuracy in runs without a split."""
    return SELECTION[0] if all(r["val_accuracy"] != "" for r in runs) else SELECTION[1]


def mean_accuracy(runs: list[dict[str, object]], key: str) -> float:
    return statistics.mean(float(r[key]) for r in runs)


def percentages(accuracies: list[float]) -> str:
    """The mean accuracy in percent; with several seeds ± half their range, and each seed's."""
    if len(accuracies) == 1:
        return f"{100 * accuracies[0]:.2f} %"
    spread = 100 * (max(accuracies) - min(accuracies)) / 2
    seeds = ", ".join(f"{100 * a:.2f}" for a in accuracies)
    return f"{100 * statistics.mean(accuracies):.2f} ± {spread:.2f} % ({seeds})"


def variant_row(variant: str, runs: list[dict[str, object]], base: list[dict[str, object]] | None) -> dict[str, str]:
    """One table row: mean best validation accuracy (empty without a validation split) and test accuracy, the
    difference to the base on validation accuracy (test accuracy without a split), T, epochs, wall time, spikes."""
    key = selection_key(runs)
    delta = "" if base is None else f"{100 * (mean_accuracy(runs, key) - mean_accuracy(base, key)):+.2f}"
    return {
        "variant": f"`{variant}`" if variant else "base",
        "val accuracy": percentages([float(r["val_accuracy"]) for r in runs]) if key == SELECTION[0] else "",
        "test accuracy": percentages([float(r["test_accuracy"]) for r in runs]),
        "Δ vs base": delta,
        "T": str(runs[0]["seq_length"]),
        "epochs": str(runs[0]["epochs"]),
        "wall s": f"{statistics.mean(float(r['process_wall_s']) for r in runs):.0f}",
        "spikes/sample": f"{statistics.mean(float(r['spikes_per_sample']) for r in runs):.0f}",
        "seeds": str(len(runs)),
    }


def markdown(base: str, rows: list[dict[str, str]], test: bool) -> str:
    """The table; the test accuracy column only when ``test`` (a grid that chooses settings leaves it out)."""
    columns = [c for c in COLUMNS if test or c != "test accuracy"]
    lines = [f"Base: `snn-train {base}`", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row[c] for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="*", help="overrides on top of the base, one quoted string per variant")
    parser.add_argument("--base", default="", help="overrides every run shares, one quoted string")
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0], help="train.seed values; each variant runs once per seed"
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for the runs, their logs and ablation.md")
    parser.add_argument("--test", action="store_true", help="show the test accuracy (for the chosen configurations)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results, rows = {}, []
    for n, variant in enumerate(["", *args.variants]):
        overrides = shlex.split(args.base) + shlex.split(variant)
        runs = [run(args.out, f"{n}_seed{seed}", [*overrides, f"train.seed={seed}"]) for seed in args.seeds]
        results[variant or "base"] = runs
        rows.append(variant_row(variant, runs, results["base"] if variant else None))
        table = markdown(args.base, rows, args.test)
        (args.out / "ablation.md").write_text(table)  # after every variant, so a long grid shows its progress
    (args.out / "ablation.json").write_text(json.dumps(results, indent=2))
    print(table, end="")


if __name__ == "__main__":
    main()
