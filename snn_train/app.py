"""Running a Hydra app as a command: the schema registered, ``--version`` answered, and every error a user can cause
in one line.

An entry point is ``run_app("<command>", app)``, with ``app`` wrapping its work in ``errors.reported("<command>")``.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable

from hydra.errors import HydraException, MissingConfigException, OverrideParseException

from snn_train import schema, usage
from snn_train.errors import fail


def hydra_message(error: HydraException) -> str:
    """Hydra's message without its layout: first lines of it and of its cause, and the options it lists."""
    message = str(error).strip().splitlines()[0].rstrip(".")
    if isinstance(error, OverrideParseException):
        message = f"cannot parse override {error.override!r}: {message}"
    if error.__cause__ is not None and str(error.__cause__).strip():
        message += f": {str(error.__cause__).strip().splitlines()[0]}"
    if isinstance(error, MissingConfigException) and error.options:
        message += f" (options: {', '.join(error.options)})"
    return message


def raised_in_hydra(error: BaseException) -> bool:
    """Whether ``error`` was raised in Hydra's code: it reports some bad overrides (``data=0``) as a ValueError."""
    frame = error.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    return frame is not None and frame.tb_frame.f_globals.get("__name__", "").startswith("hydra.")


def run_app(command: str, app: Callable[[], object]) -> None:
    """Run a Hydra app (e.g. a ``@hydra.main`` function called without arguments) as the entry point ``command``:
    the schema and the help's resolvers registered, ``--version`` answered with this package's version (Hydra's names
    only Hydra), Hydra's own errors (bad overrides, a run folder it cannot create) in ``fail``'s one line too. The app
    reports ours with ``errors.reported(command)``."""
    if "--version" in sys.argv[1:]:
        print(usage.version_line(command))
        sys.exit(0)
    schema.register()
    usage.register()
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises its errors to us instead of printing them with a stack trace
    try:
        app()
    except HydraException as error:
        fail(command, hydra_message(error))
    except OSError as error:
        fail(command, f"{error.strerror or error}: {error.filename}" if error.filename else str(error))
    except ValueError as error:
        if not raised_in_hydra(error):
            raise
        fail(command, str(error))
    except KeyboardInterrupt:
        print(f"{command}: interrupted before it started", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
