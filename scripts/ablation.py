"""Run an ablation grid with snn-train and write a Markdown table: best validation accuracy, test accuracy, T, epochs,
wall time, spikes per sample.

Each variant is a set of overrides applied on top of ``--base``; the base itself is the first row. Every variant runs
once per seed, one after another (so wall times are comparable), each as its own ``snn-train`` process.

Usage: python scripts/ablation.py --out DIR --base "+experiment=fast data.root=../shared/data" \\
           "model.batch_norm=false" "augment.shift=0 augment.rotate=0 augment.scale=0" [--seeds 0 1]
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


def mean_accuracy(runs: list[dict[str, object]]) -> float:
    return statistics.mean(float(r["test_accuracy"]) for r in runs)


def percentages(accuracies: list[float]) -> str:
    """The mean accuracy in percent, and each seed's when there are several."""
    seeds = f" ({', '.join(f'{100 * a:.2f}' for a in accuracies)})" if len(accuracies) > 1 else ""
    return f"{100 * statistics.mean(accuracies):.2f} %{seeds}"


def variant_row(variant: str, runs: list[dict[str, object]], base_accuracy: float | None) -> dict[str, str]:
    """One table row: mean best validation accuracy (empty without a validation split) and test accuracy (and each
    seed's), the test accuracy's difference to the base, T, epochs, wall time, spikes."""
    validated = all(r["val_accuracy"] != "" for r in runs)
    accuracy = mean_accuracy(runs)
    delta = "" if base_accuracy is None else f"{100 * (accuracy - base_accuracy):+.2f}"
    return {
        "variant": f"`{variant}`" if variant else "base",
        "val accuracy": percentages([float(r["val_accuracy"]) for r in runs]) if validated else "",
        "test accuracy": percentages([float(r["test_accuracy"]) for r in runs]),
        "Δ vs base": delta,
        "T": str(runs[0]["seq_length"]),
        "epochs": str(runs[0]["epochs"]),
        "wall s": f"{statistics.mean(float(r['process_wall_s']) for r in runs):.0f}",
        "spikes/sample": f"{statistics.mean(float(r['spikes_per_sample']) for r in runs):.0f}",
        "seeds": str(len(runs)),
    }


def markdown(base: str, rows: list[dict[str, str]]) -> str:
    lines = [f"Base: `snn-train {base}`", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row[c] for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="*", help="overrides on top of the base, one quoted string per variant")
    parser.add_argument("--base", default="", help="overrides every run shares, one quoted string")
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0], help="train.seed values; each variant runs once per seed"
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for the runs, their logs and ablation.md")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results, rows, base_accuracy = {}, [], None
    for n, variant in enumerate(["", *args.variants]):
        overrides = shlex.split(args.base) + shlex.split(variant)
        runs = [run(args.out, f"{n}_seed{seed}", [*overrides, f"train.seed={seed}"]) for seed in args.seeds]
        results[variant or "base"] = runs
        rows.append(variant_row(variant, runs, base_accuracy))
        base_accuracy = mean_accuracy(results["base"])
        table = markdown(args.base, rows)
        (args.out / "ablation.md").write_text(table)  # after every variant, so a long grid shows its progress
    (args.out / "ablation.json").write_text(json.dumps(results, indent=2))
    print(table, end="")


if __name__ == "__main__":
    main()
