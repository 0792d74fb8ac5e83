"""The errors a user can cause and fix, and how they are reported: ``<command>: error: <one line>``, exit code 2.

Inside a Hydra app, ``reported`` turns ours into that line; app.run_app does the same for Hydra's.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

from omegaconf.errors import OmegaConfBaseException


class UserError(Exception):
    """An error the user can fix; its message is one line saying what is wrong and what to change."""


class ConfigError(UserError, ValueError):
    """A config value that composes but cannot work; the message says what to change."""


class DataError(UserError, RuntimeError):
    """A dataset that is missing or corrupt; the message names the file and the fix."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint or run-folder file that cannot be written or read; the message names the path and the reason."""


class ExportError(UserError, ValueError):
    """A network or request the NIR export cannot serve (snn-export); the message names the part and the fix."""


class TrainingError(UserError, RuntimeError):
    """The run cannot go on (a NaN or infinite loss); the message gives the step and the checkpoint left intact."""


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived; the loop wrote a checkpoint at the next step boundary and stopped."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum


def fail(command: str, message: str) -> NoReturn:
    """Exit 2 with one line on stderr: the convention for errors a user can cause and fix."""
    print(f"{command}: error: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(2)


def write_error(path: object, error: OSError) -> CheckpointError:
    """A failed write (disk full, permissions, any OSError) of ``path`` as a one-line CheckpointError."""
    return CheckpointError(f"cannot write {path} ({error.strerror or error})")


def config_message(error: OmegaConfBaseException) -> str:
    """An OmegaConf error's first line, after the key it names (when it names one)."""
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"{error.full_key}: {message}" if getattr(error, "full_key", None) else message


@contextmanager
def reported(command: str) -> Iterator[None]:
    """Inside a Hydra app: our errors as ``fail``'s one line, and OmegaConf's (a key an override removed or forced in,
    met after the checks); an interrupted run exits 128 + the signal's number."""
    try:
        yield
    except UserError as error:
        fail(command, str(error))
    except OmegaConfBaseException as error:
        fail(command, config_message(error))
    except Interrupted as stop:
        print(f"{command}: {stop}", file=sys.stderr)
        sys.exit(128 + stop.signum)
