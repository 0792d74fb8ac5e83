#!/usr/bin/env bash
# On a machine with a CUDA GPU, in one command: the `gpu` and `triton` tests run natively, scripts/benchmark.py on the
# GPU (Norse 1.1.0 and, where it installs, SpikingJelly's multi-step LIF as anchors) and one default epoch of snn-train
# with its wall time; everything lands in OUT/gpu_check.json (the parts' own files beside it).
#
# Usage: scripts/gpu_check.sh OUT DATA_ROOT [WHEELS]
#   DATA_ROOT holds MNIST/raw/*-ubyte; nothing is downloaded.
#   WHEELS, for a machine with no package index (a cluster's compute node): a folder of wheels that pip installs from
#   instead, holding what that machine's Python lacks of the package, its `gpu-check` extra, SpikingJelly and loguru
#   (README, "Checking a GPU machine", lists them and how to fetch them elsewhere).
# GPU_CHECK_PART_S (default 1800) limits each part's seconds, so that one that hangs leaves the others their time.
set -uo pipefail
out=${1:?usage: scripts/gpu_check.sh OUT DATA_ROOT [WHEELS]}
data=${2:?usage: scripts/gpu_check.sh OUT DATA_ROOT [WHEELS]}
index=()
if [[ -n ${3:-} ]]; then
    wheels=$(cd "$3" && pwd) || exit 2
    index=(--no-index --find-links "$wheels")
fi
cd "$(dirname "$0")/.."
if ! python3 -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu_check.sh: error: torch sees no CUDA GPU here; run this on a machine with one" >&2
    exit 2
fi
mkdir -p "$out" && out=$(cd "$out" && pwd) && data=$(cd "$data" && pwd) || exit 2
# the tests start snn-train, which pip puts beside this Python
PATH="$(python3 -c 'import os, sys; print(os.path.dirname(sys.executable))'):$PATH"

python3 -m pip install --quiet "${index[@]}" -e ".[gpu-check]" \
    || echo "gpu_check.sh: the gpu-check extra (pytest, Norse 1.1.0) did not install" >&2
# SpikingJelly without its dependencies, which would replace torch; it needs loguru besides what is here
python3 -m pip install --quiet "${index[@]}" --no-deps spikingjelly && python3 -m pip install --quiet "${index[@]}" loguru \
    || echo "gpu_check.sh: SpikingJelly did not install; the benchmark leaves it out" >&2

limit=${GPU_CHECK_PART_S:-1800}  # seconds each part (tests, benchmark, epoch) may take; a part over it exits 124
rm -rf "$out"/tests.xml "$out"/benchmark.json "$out"/epoch
timeout "$limit" python3 -m pytest -m "gpu or triton" -n 4 -q -rfEs --junitxml "$out/tests.xml" 2>&1 | tee "$out/tests.log"
tests_status=${PIPESTATUS[0]}
timeout "$limit" python3 scripts/benchmark.py --device cuda --json "$out/benchmark.json" 2>&1 | tee "$out/benchmark.log"
benchmark_status=${PIPESTATUS[0]}
started=$(date +%s.%N)
timeout "$limit" snn-train data.root="$data" data.download=false train.device=cuda hydra.run.dir="$out/epoch" 2>&1 \
    | tee "$out/epoch.log"
epoch_status=${PIPESTATUS[0]}
ended=$(date +%s.%N)

python3 - "$out" "$tests_status" "$benchmark_status" "$epoch_status" "$started" "$ended" <<'EOF'
import json, sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import torch

out, tests, benchmark, epoch, started, ended = Path(sys.argv[1]), *map(int, sys.argv[2:5]), *map(float, sys.argv[5:7])
report = {
    "gpu": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(), "torch": torch.__version__,
    "tests": {"exit_status": tests},
    "benchmark": {"exit_status": benchmark},  # its figures follow, also where a part of it failed (exit status 1)
    "default_epoch": {"exit_status": epoch, "wall_s": round(ended - started, 1)},
}
if (out / "tests.xml").exists():
    suite = ElementTree.parse(out / "tests.xml").getroot().find("testsuite")
    report["tests"] |= {key: int(suite.get(key)) for key in ("tests", "failures", "errors", "skipped")}
if (out / "benchmark.json").exists():
    report["benchmark"] |= json.loads((out / "benchmark.json").read_text())
if (out / "epoch" / "metrics.json").exists():
    report["default_epoch"]["metrics"] = json.loads((out / "epoch" / "metrics.json").read_text())["final"]
(out / "gpu_check.json").write_text(json.dumps(report, indent=2))
print(f"gpu_check.sh: wrote {out / 'gpu_check.json'}")
EOF
exit $(( tests_status || benchmark_status || epoch_status ))
