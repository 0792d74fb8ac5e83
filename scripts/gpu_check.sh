#!/usr/bin/env bash
# On a machine with a CUDA GPU, in one command: the `gpu` and `triton` tests run natively, scripts/benchmark.py on the
# GPU (Norse 1.1.0 and, where it installs, SpikingJelly's multi-step LIF as anchors) and one default epoch of snn-train
# with its wall time; everything lands in OUT/gpu_check.json (the parts' own files beside it).
#
# Usage: scripts/gpu_check.sh OUT DATA_ROOT      (DATA_ROOT holds MNIST/raw/*-ubyte; nothing is downloaded)
set -uo pipefail
out=${1:?usage: scripts/gpu_check.sh OUT DATA_ROOT}
data=${2:?usage: scripts/gpu_check.sh OUT DATA_ROOT}
cd "$(dirname "$0")/.."
if ! python -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu_check.sh: error: torch sees no CUDA GPU here; run this on a machine with one" >&2
    exit 2
fi
mkdir -p "$out" && out=$(cd "$out" && pwd) && data=$(cd "$data" && pwd) || exit 2

python -m pip install --quiet -e ".[test]" || echo "gpu_check.sh: the test extra (pytest, Norse 1.1.0) did not install" >&2
# SpikingJelly without its dependencies, which would replace torch; it needs loguru besides what is here
python -m pip install --quiet --no-deps spikingjelly && python -m pip install --quiet loguru \
    || echo "gpu_check.sh: SpikingJelly did not install; the benchmark leaves it out" >&2

python -m pytest -m "gpu or triton" -q -rfEs --junitxml "$out/tests.xml" 2>&1 | tee "$out/tests.log"
tests_status=${PIPESTATUS[0]}
python scripts/benchmark.py --device cuda --json "$out/benchmark.json" 2>&1 | tee "$out/benchmark.log"
benchmark_status=${PIPESTATUS[0]}
started=$(date +%s.%N)
snn-train data.root="$data" data.download=false train.device=cuda hydra.run.dir="$out/epoch" 2>&1 | tee "$out/epoch.log"
epoch_status=${PIPESTATUS[0]}
ended=$(date +%s.%N)

python - "$out" "$tests_status" "$benchmark_status" "$epoch_status" "$started" "$ended" <<'EOF'
import json, sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import torch

out, tests, benchmark, epoch, started, ended = Path(sys.argv[1]), *map(int, sys.argv[2:5]), *map(float, sys.argv[5:7])
suite = ElementTree.parse(out / "tests.xml").getroot().find("testsuite")
report = {
    "gpu": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(), "torch": torch.__version__,
    "tests": {"exit_status": tests, **{key: int(suite.get(key)) for key in ("tests", "failures", "errors", "skipped")}},
    "benchmark": json.loads((out / "benchmark.json").read_text()) if benchmark == 0 else {"exit_status": benchmark},
    "default_epoch": {"exit_status": epoch, "wall_s": round(ended - started, 1)},
}
if epoch == 0:
    report["default_epoch"]["metrics"] = json.loads((out / "epoch" / "metrics.json").read_text())["final"]
(out / "gpu_check.json").write_text(json.dumps(report, indent=2))
print(f"gpu_check.sh: wrote {out / 'gpu_check.json'}")
EOF
exit $(( tests_status || benchmark_status || epoch_status ))
