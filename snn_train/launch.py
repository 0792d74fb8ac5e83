"""What the launcher asks of this process, read from the environment without torch: whether it is one of several
(torchrun's WORLD_SIZE, or a submitit SLURM job of several tasks, whose torchrun variables are set here first).

``distributed`` joins the process group when it is; the entry points ask before Hydra starts, so that a plain
command, ``--help`` and TAB completion start without torch.
"""

from __future__ import annotations

import os


def export_submitit_environment() -> None:
    """In a submitit SLURM job of several tasks, set torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*)."""
    if "RANK" in os.environ or os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
        return
    import submitit  # the slurm extra; present whenever submitit launched this process

    if submitit.JobEnvironment().num_tasks > 1:
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def several_processes() -> bool:
    """Whether this process is one of several (WORLD_SIZE above 1, once a submitit job's variables are set)."""
    export_submitit_environment()
    return int(os.environ.get("WORLD_SIZE", "1")) > 1
