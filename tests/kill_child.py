"""Run ``snn-train`` and make the process die at a chosen point, for the kill-and-resume tests.

Usage: python kill_child.py EVENT:N [snn-train overrides ...]

  step:N   SIGKILL right after this process's N-th optimizer step (mid-epoch)
  term:N   SIGTERM right after the N-th optimizer step (a preemption: the run should stop cleanly)
  eval:N   SIGKILL at the N-th forward pass of the network in eval mode (inside an epoch-end evaluation)
  save:N   SIGKILL halfway through writing the N-th torch.save file (inside a checkpoint write)
  full:N   the N-th torch.save file stops halfway with ENOSPC, as on a full disk (the run should stop cleanly)

The points are found with PyTorch's global hooks and a wrapper around torch.save; snn_train itself is unchanged.
"""

from __future__ import annotations

import errno
import io
import os
import signal
import sys
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

EVENT, COUNT = sys.argv[1].split(":")
calls = 0


def reached() -> bool:
    global calls
    calls += 1
    return calls == int(COUNT)


def after_optimizer_step(*_: Any) -> None:
    if reached():
        os.kill(os.getpid(), signal.SIGKILL if EVENT == "step" else signal.SIGTERM)


def before_forward(module: torch.nn.Module, _: Any) -> None:
    if type(module).__name__ == "ConvSNN" and not module.training and reached():
        os.kill(os.getpid(), signal.SIGKILL)


real_save = torch.save


def half_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
    if not reached():
        return real_save(obj, f, *args, **kwargs)
    buffer = io.BytesIO()
    real_save(obj, buffer, *args, **kwargs)
    f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    f.flush()
    if EVENT == "full":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    os.kill(os.getpid(), signal.SIGKILL)


if EVENT in ("step", "term"):
    register_optimizer_step_post_hook(after_optimizer_step)
elif EVENT == "eval":
    torch.nn.modules.module.register_module_forward_pre_hook(before_forward)
else:
    torch.save = half_save

from snn_train.cli import train  # noqa: E402  (after the hooks, as a user would start snn-train)

sys.argv = ["snn-train", *sys.argv[2:]]
train()
