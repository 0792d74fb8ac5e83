"""What the commands say about themselves: the parts of ``--help`` generated from the config, and ``--version``.

The help text is Hydra's help template (``configs/hydra/help/*.yaml``); its config groups and keys come from
the resolvers ``register`` adds, which read the composed config, so a new group or key shows up without editing the
help. ``app.run_app`` answers ``--version`` with ``version_line`` before Hydra (whose own names only Hydra).
"""

from __future__ import annotations

import json
import textwrap
from importlib.metadata import version
from typing import Any

import hydra
from hydra.core.global_hydra import GlobalHydra
from hydra.core.object_type import ObjectType
from omegaconf import DictConfig, ListConfig, OmegaConf

from snn_train.schema import flat_config


def version_line(command: str) -> str:
    """``snn-train 0.1.0 (torch …, Hydra …)``: this package's installed version and those it runs on (torch's as it
    names itself, with its CUDA or CPU build tag, which its package metadata lacks)."""
    import torch  # only here: --help and TAB completion do without it

    return f"{command} {version('snn-train')} (torch {torch.__version__}, Hydra {hydra.__version__})"


def app_keys(root: DictConfig) -> dict[str, Any]:
    """The composed config without its ``hydra`` node, as flat ``a.b.c`` keys (``???`` for a value still to set)."""
    return flat_config(OmegaConf.masked_copy(root, [key for key in root if key != "hydra"]))


def show(value: Any) -> str:
    """A value as it is typed on the command line: null, true, [32, 64], text unquoted."""
    text = value if isinstance(value, str) else json.dumps(value)
    return text.replace("$", "$$")  # Hydra fills the template with string.Template, where $ is special


def groups_help(added: ListConfig, hidden: ListConfig, _root_: DictConfig) -> str:
    """The config groups of the command's defaults list but ``hidden``, then ``added`` (the ``+group=`` ones), with
    their options.

    A group nested in another's folder (``model/network``) is a building block of that group's options, and the
    schema groups are never chosen, so neither is listed; Hydra's own groups are ``--hydra-help``'s. ``hidden`` are
    groups in the defaults list only so that another group's options compose (snn-eval's ``encoder``).
    """
    choices = _root_.hydra.runtime.choices
    names = sorted(group for group in choices if "/" not in group and group not in (*added, *hidden))
    rows = [(group, group) for group in names] + [(group, f"+{group}") for group in added]
    loader = GlobalHydra.instance().config_loader()
    width = max((len(label) for _, label in rows), default=0) + 2
    lines = ["Config groups (group=option; * marks the one in use):"]
    for group, label in rows:
        options = sorted(loader.get_group_options(group, results_filter=ObjectType.CONFIG))
        marked = [f"{option}*" if option == choices.get(group) else option for option in options]
        lines.append(f"  {label:<{width}}{', '.join(marked)}")
    return "\n".join(lines)


def keys_help(most_used: ListConfig, hidden: ListConfig, _root_: DictConfig) -> str:
    """``most_used`` keys with their values in this composition, then the names of all other keys but ``hidden``."""
    flat = {key: value for key, value in app_keys(_root_).items() if key.split(".")[0] not in hidden}
    lines = ["Most used keys (key=default, after the overrides given; ??? = required):"]
    listed: set[str] = set()
    for name in most_used:
        keys = [key for key in flat if key == name or key.startswith(f"{name}.")]
        if not keys:
            raise KeyError(f"the help lists {name}, which the config lacks")
        lines += [f"  {key}={show(flat[key])}" for key in keys]
        listed.update(keys)
    others = [key for key in flat if key not in listed]
    if others:
        command = _root_.hydra.help.app_name
        lines += ["", f"Other keys ({command} --cfg job prints all values):"]
        lines += textwrap.wrap(", ".join(brace_groups(others)), width=100, initial_indent="  ", subsequent_indent="  ")
    return "\n".join(lines)


def brace_groups(keys: list[str]) -> list[str]:
    """``a.b, a.c, d`` as ``a.{b, c}, d``: sibling keys under their parent's path, in config order."""
    siblings: dict[str, list[str]] = {}
    for key in keys:
        parent, _, name = key.rpartition(".")
        siblings.setdefault(parent, []).append(name)
    return [
        ", ".join(names)
        if not parent
        else f"{parent}.{names[0]}"
        if len(names) == 1
        else f"{parent}.{{{', '.join(names)}}}"
        for parent, names in siblings.items()
    ]


def register() -> None:
    """Register the resolvers the help templates use (app.run_app calls it); calling it again changes nothing."""
    OmegaConf.register_new_resolver("snn_train_help_groups", groups_help, replace=True)
    OmegaConf.register_new_resolver("snn_train_help_keys", keys_help, replace=True)
