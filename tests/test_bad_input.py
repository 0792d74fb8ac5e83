"""Random override lists (hypothesis): each composes into a config that builds, or fails with one clean line."""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch
from hydra.errors import HydraException
from hypothesis import given, settings
from hypothesis import strategies as st

from snn_train import load_config
from snn_train.app import hydra_message, raised_in_hydra
from snn_train.encoders import build_encoder
from snn_train.errors import ConfigError
from snn_train.schema import flat_config
from snn_train.task import build_model, build_optimizer, build_scheduler

CONFIGS = Path(__file__).parents[1] / "configs"
GROUPS = {
    group: sorted(path.stem for path in (CONFIGS / group).glob("*.yaml"))
    for group in ("model", "encoder", "data", "optim")
}
# Keys drawn: every leaf of the default config but those that point at files (the CLI examples set them).
KEYS = sorted(key for key in flat_config(load_config([])) if key not in ("data.root", "data.download", "train.resume"))

garbage = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12)
numbers = st.one_of(
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, -1, 10**30, 2**64, 1e-300, 1e300]),
).map(str)
values = st.one_of(
    numbers,
    st.sampled_from(["true", "false", "null", "''", "[]", "{}", "${oops}", "${train.epochs}"]),
    st.lists(st.integers(-3, 40), max_size=3).map(lambda items: f"[{','.join(map(str, items))}]"),
    garbage,
)
override = st.one_of(
    st.tuples(st.sampled_from(KEYS), numbers).map("=".join),  # a known key, a number: often composes, then checked
    st.tuples(st.sampled_from(KEYS), values).map("=".join),  # a known key, any value
    st.tuples(st.sampled_from(sorted(GROUPS)), st.one_of(st.sampled_from(sum(GROUPS.values(), [])), garbage)).map(
        "=".join
    ),
    st.tuples(st.from_regex(r"[a-z_]{1,8}(\.[a-z_]{1,8}){0,2}", fullmatch=True), values).map("=".join),  # unknown keys
    st.tuples(st.sampled_from(["~", "+", "++"]), st.sampled_from(KEYS), values).map(lambda t: f"{t[0]}{t[1]}={t[2]}"),
    garbage,
)
override_lists = st.lists(override, max_size=3)


def build_everything(overrides: list[str]) -> None:
    """Compose and check as snn-train does, then build the network (without memory), encoder, optimizer and schedule."""
    cfg = load_config(overrides)
    with torch.device("meta"):
        model = build_model(cfg, (1, 28, 28), torch.device("meta"))
        build_encoder(cfg.encoder, cfg.seq_length)
        build_scheduler(build_optimizer(model, cfg.optim), cfg, 100)


@settings(max_examples=150, deadline=None)
@given(override_lists)
def test_random_overrides_build_or_fail_with_one_clean_line(overrides: list[str]) -> None:
    try:
        build_everything(overrides)
    except ConfigError as error:
        assert str(error).strip() and "\n" not in str(error)
    except HydraException as error:  # snn-train prints hydra_message(error) as its one line
        assert hydra_message(error).strip() and "\n" not in hydra_message(error)
    except ValueError as error:  # snn-train prints Hydra's ValueErrors (and only those) as its one line
        assert raised_in_hydra(error), error


@pytest.mark.slow
@settings(max_examples=3, deadline=None)
@given(override_lists)
def test_random_overrides_on_the_command_line_end_in_one_line_and_no_traceback(overrides: list[str]) -> None:
    """With no data there, a config that is fine ends in the missing-data error: every example exits 2 with one line."""
    with tempfile.TemporaryDirectory() as folder:
        result = subprocess.run(
            [
                "snn-train",
                *overrides,
                f"data.root={folder}/nothing",
                "data.download=false",
                f"hydra.run.dir={folder}/run",
            ],
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=300,
        )
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("snn-train: error: "), result.stderr


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["seq_length=${oops}"], "seq_length: Interpolation key 'oops' not found"),
        (["model.lif.v_leak=inf"], "model.lif.v_leak=inf is not a finite number"),
        (["model.kernel_sizes=[13,13]"], "input (1, 28, 28) is too small for the conv/pool stack"),
        (["model.num_classes=18446744073709551616"], "cannot build the network from model.*: empty(): argument 'size'"),
        (["model.conv_channels=${train.epochs}"], "an interpolation: Invalid value assigned: int is not a ListConfig"),
        (["model.num_classes=5"], "model.num_classes=5 but mnist has 10 classes"),
        (["optim.momentum=1"], "optim.momentum is adam's beta1 and must be < 1"),
        (["model.fc_features=[0]"], "model.fc_features must hold sizes > 0, got [0]"),
        (["train.checkpoint_every_n_steps=0"], "train.checkpoint_every_n_steps must be > 0"),
        (["train.on_nan=ignore"], "train.on_nan=ignore is not one of stop, skip"),
        (["~warmup_epochs=0", "~loss"], "missing config values: loss, warmup_epochs; set them on the command line"),
    ],
)
def test_what_the_random_search_found_is_refused_by_name(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_everything(overrides)
