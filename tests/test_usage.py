"""``snn-train --help``, ``snn-eval --help``, ``snn-export --help``, ``--version`` and shell completion, run as a user
would, against the config files."""

from __future__ import annotations

import ast
import functools
import os
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

import hydra
import pytest
import torch
import yaml
from omegaconf import OmegaConf

from snn_train.config import compose
from snn_train.schema import flat_config

pytestmark = pytest.mark.slow  # each test starts a command (snn-train, snn-eval, snn-export) as a process

ROOT = Path(__file__).parents[1]
CONFIGS = ROOT / "configs"
PRIMARY = {"snn-train": "config", "snn-eval": "eval", "snn-export": "export"}
# snn-eval composes an encoder group only for data=nmnist's choice of encoder=events; it runs the checkpoint's encoder
NOT_TAKEN = {"snn-eval": {"encoder"}}
CASES = [
    ("snn-train", ()),
    ("snn-train", ("+experiment=fast", "optim=sgd")),
    ("snn-eval", ()),
    ("snn-eval", ("data=kmnist",)),
    ("snn-eval", ("data=nmnist",)),
    ("snn-export", ()),
    ("snn-export", ("input_shape=[1,20,20]",)),
]


@functools.cache
def help_text(command: str, overrides: tuple[str, ...]) -> str:
    result = subprocess.run([command, *overrides, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def section(text: str, heading: str) -> list[str]:
    """The lines under the paragraph that starts with ``heading``, up to the next blank line; [] if there is none."""
    for paragraph in text.split("\n\n"):
        if paragraph.startswith(heading):
            return paragraph.splitlines()[1:]
    return []


def listed_groups(text: str) -> dict[str, list[str]]:
    """``{group label: options}`` of the help's group section; the option in use keeps its ``*``."""
    rows = [line.split(maxsplit=1) for line in section(text, "Config groups")]
    return {label: options.split(", ") for label, options in rows}


def group_options(group: str) -> list[str]:
    return sorted(path.stem for path in (CONFIGS / group).glob("*.yaml"))


def config_groups(command: str) -> set[str]:
    """The groups a command takes, from the files: every folder for snn-train, its defaults list for the others."""
    if command == "snn-train":
        return {path.name for path in CONFIGS.iterdir() if path.is_dir() and path.name not in ("hydra", "__pycache__")}
    defaults = yaml.safe_load((CONFIGS / f"{PRIMARY[command]}.yaml").read_text())["defaults"]
    keys = {key for entry in defaults if isinstance(entry, dict) for key in entry if not key.startswith("override")}
    return keys - NOT_TAKEN.get(command, set())


def composed(command: str, overrides: tuple[str, ...]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The command's config as Hydra composes it, as flat ``a.b.c`` keys, and the option chosen in each group."""
    cfg = compose(PRIMARY[command], list(overrides), return_hydra_config=True)
    choices = OmegaConf.to_container(cfg.hydra.runtime.choices)
    del cfg.hydra
    return flat_config(cfg), choices


def expand(names: str) -> list[str]:
    """``a.{b, c}, d`` as ``[a.b, a.c, d]``."""
    keys = []
    for parent, children, plain in re.findall(r"([\w.]+)\.\{([^}]*)\}|([\w.]+)", names):
        keys += [f"{parent}.{child.strip()}" for child in children.split(",")] if parent else [plain]
    return keys


@pytest.mark.parametrize(("command", "overrides"), CASES)
def test_help_introduces_the_command_and_lists_its_own_groups_with_every_option(
    command: str, overrides: tuple[str, ...]
) -> None:
    text = help_text(command, overrides)
    assert text.startswith(f"{command}: ") and f"Usage: {command} " in text
    assert "powered by Hydra" not in text and "schema" not in text and "model/network" not in text
    assert "--cfg job" in text and "README.md" in text
    groups = listed_groups(text)
    assert {label.lstrip("+") for label in groups} == config_groups(command)
    _, choices = composed(command, overrides)
    for label, options in groups.items():
        group = label.lstrip("+")
        assert [option.rstrip("*") for option in options] == group_options(group)
        in_use = [option.rstrip("*") for option in options if option.endswith("*")]
        assert in_use == ([choices[group]] if choices.get(group) else [])


@pytest.mark.parametrize(("command", "overrides"), CASES)
def test_help_names_every_key_of_the_config_and_the_values_of_the_most_used(
    command: str, overrides: tuple[str, ...]
) -> None:
    text = help_text(command, overrides)
    config, _ = composed(command, overrides)
    most_used = dict(line.strip().split("=", 1) for line in section(text, "Most used keys"))
    assert len(most_used) >= min(5, len(config))
    assert {key: yaml.safe_load(value) for key, value in most_used.items()} == {key: config[key] for key in most_used}
    others = expand(" ".join(section(text, "Other keys")))
    taken = [key for key in config if key.split(".")[0] not in NOT_TAKEN.get(command, set())]
    assert sorted([*most_used, *others]) == sorted(taken)


@pytest.mark.parametrize("command", PRIMARY)
def test_version_names_the_package_torch_and_hydra_versions(command: str) -> None:
    result = subprocess.run([command, "--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{command} {version('snn-train')} (torch {torch.__version__}, Hydra {hydra.__version__})\n"


def run_noting_modules(
    arguments: list[str], env: dict[str, str] | None = None
) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Run the command ``arguments[0]`` (its entry point in snn_train.cli) with ``arguments`` in a fresh process: its
    result, and the snn_train and torch modules (torchvision too) it had imported when it exited, which it writes as
    the last line of its stderr (taken off the result's)."""
    entry = {"snn-train": "train", "snn-eval": "evaluate", "snn-export": "export"}[arguments[0]]
    program = (
        "import atexit, sys\n"
        "ours = lambda: sorted(m for m in sys.modules if m.startswith(('snn_train', 'torch')))\n"
        "atexit.register(lambda: print(ours(), file=sys.stderr))\n"
        f"sys.argv = {arguments!r}\n"
        f"from snn_train.cli import {entry}\n"
        f"{entry}()\n"
    )
    result = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=120)
    *stderr, loaded = result.stderr.splitlines()
    assert loaded.startswith("["), result.stderr
    result.stderr = "".join(f"{line}\n" for line in stderr)
    return result, set(ast.literal_eval(loaded))


@pytest.mark.parametrize(
    "command, line, completions",
    [
        ("snn-train", "snn-train model=t", "model=tanh model=triangle"),
        ("snn-train", "snn-train train.ep", "train.epochs="),
        ("snn-eval", "snn-eval data=k", "data=kmnist"),
    ],
)
def test_tab_completion_offers_the_configs_without_loading_torch_or_the_training_code(
    command: str, line: str, completions: str
) -> None:
    """What bash's TAB asks (``-sc query=bash`` with COMP_LINE, as Hydra's installed completion does), answered
    without importing torch or the modules that train, evaluate or check a config: each TAB starts the command
    afresh."""
    env = {**os.environ, "COMP_LINE": line, "COMP_POINT": str(len(line))}
    result, loaded = run_noting_modules([command, "-sc", "query=bash"], env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == completions.split()
    assert {"snn_train.cli", "snn_train.schema", "snn_train.usage"} <= loaded
    assert not {"torch", "snn_train.config", "snn_train.train", "snn_train.report", "snn_train.model"} & loaded


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["snn-train", "seq_length=0"], "snn-train: error: seq_length must be > 0, got 0;"),
        (["snn-eval", "checkpoint=run", "batch_size=0"], "snn-eval: error: batch_size must be > 0, got 0;"),
        (["snn-export", "checkpoint=run", "input_shape=[1,28]"], "snn-export: error: input_shape must be [channels,"),
    ],
)
def test_a_value_that_cannot_work_is_told_before_the_work_and_torchvision_load(
    arguments: list[str], message: str
) -> None:
    """A bad value is checked and told in one line once the config is composed, before the modules that train,
    evaluate or export and torchvision (seconds to import, torch._dynamo with it) are loaded: the user waits for torch
    and the check alone."""
    result, loaded = run_noting_modules(arguments)
    assert result.returncode == 2
    assert result.stdout == "" and result.stderr.startswith(message) and result.stderr.count("\n") == 1
    assert "snn_train.config" in loaded
    assert not {"torchvision", "torch._dynamo", "snn_train.train", "snn_train.report", "snn_train.export"} & loaded
