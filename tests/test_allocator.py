"""The allocator setting: large tensors freed and allocated again reuse warm pages instead of faulting."""

from __future__ import annotations

import subprocess
import sys

import pytest

SCRIPT = """
import resource, torch
from snn_train.allocator import keep_freed_memory

def faults_per_allocation():
    # a 64 MiB tensor allocated and freed again and again, as a training step's activations are
    for _ in range(3):
        torch.ones(16 * 2**20)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        torch.ones(16 * 2**20)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 5

default = faults_per_allocation()
applied = keep_freed_memory()
faults_per_allocation()  # the heap grows to hold the block (how soon depends on what the process did before)
print(default, applied, faults_per_allocation())
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_freed_memory_is_reused_without_page_faults() -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True)
    default, applied, tuned = done.stdout.split()
    assert applied == "True"
    if int(default) < 4000:  # 64 MiB is 16,384 fresh 4 KiB pages; huge pages make it cheap anyway
        pytest.skip(f"this system faults only {default} times on a fresh 64 MiB block")
    assert int(tuned) < 100, f"{tuned} page faults with the setting, {default} without"
