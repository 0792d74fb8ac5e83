"""Train with snn_train's own functions and save this process's final weights as rank<N>.pt, to compare ranks.

Usage: torchrun --standalone --nproc_per_node=N ddp_ranks.py OUT [overrides ...]   (or plain python: one process)

The run's folder is OUT/run; snn_train itself is unchanged.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from snn_train import distributed, load_config
from snn_train.start import start_run
from snn_train.train import complete

out = Path(sys.argv[1])
with distributed.process_group():
    run = start_run(load_config(sys.argv[2:]), out / "run")
    complete(run)
    torch.save(run.model.state_dict(), out / f"rank{distributed.rank()}.pt")
