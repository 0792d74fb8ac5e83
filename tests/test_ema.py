"""train.ema_decay: the moving average of the weights, against its formula applied by hand to the raw weights of
the same run; what validations, best.pt, the test and snn-eval evaluate; resuming it; refusing it."""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig
from torch.optim.optimizer import register_optimizer_step_post_hook

from snn_train import ConvSNN, evaluation, load_config
from snn_train.checkpoint import load_checkpoint
from snn_train.config import compose
from snn_train.data import Split, hold_out, load_split
from snn_train.encoders import build_encoder
from snn_train.errors import ConfigError, Interrupted
from snn_train.report import evaluate_checkpoint
from snn_train.train import fit

DECAY = 0.5  # far from 1, so that every step moves the average visibly
# A network that learns on the tiny data (its weights move at every step), batch norm on (its running statistics are
# averaged too), a constant learning rate (a shorter run's steps are a longer one's first), validated after each step.
AVERAGED = [
    "seq_length=8",
    "model.batch_norm=true",
    "model.lif.alpha=10",
    "encoder.input_scale=5",
    "decoder=mean",
    "optim.lr=5e-3",
    "scheduler=none",
    "data.val_size=16",
    "log.val_every_n_steps=1",
    "train.test_on=last",
    f"train.ema_decay={DECAY}",
]


def checkpoint(run_dir: Path, name: str = "last.pt") -> dict:
    return load_checkpoint(run_dir / "checkpoints" / name)


def averaged(state: dict) -> dict[str, torch.Tensor]:
    """last.pt's average of the weights under the network's own names (the AveragedModel holds it as ``module``)."""
    return {key.removeprefix("module."): value for key, value in state["average"].items() if key != "n_averaged"}


def by_hand(raw: list[dict[str, torch.Tensor]], decay: float) -> list[dict[str, torch.Tensor]]:
    """The average after each step from the raw weights after each step: the first step's weights themselves
    (AveragedModel's first update copies them), then w_ema ← d·w_ema + (1 − d)·w. Floating-point entries only
    (batch norm's int64 step count is no weight)."""
    averages = [{key: value for key, value in raw[0].items() if value.is_floating_point()}]
    for weights in raw[1:]:
        averages.append({key: decay * value + (1 - decay) * weights[key] for key, value in averages[-1].items()})
    return averages


@pytest.fixture
def steps(tmp_path: Path, tiny_overrides: list[str]) -> list[Path]:
    """Runs of 1, 2 and 3 steps (one epoch of train.limit_batches batches), the same run cut short: run n's raw
    weights are those after step n."""
    runs = [tmp_path / f"{n}" for n in (1, 2, 3)]
    for n, run_dir in enumerate(runs, 1):
        fit(load_config([*tiny_overrides, *AVERAGED, f"train.limit_batches={n}"]), run_dir)
    return runs


def network(cfg: DictConfig, weights: dict[str, torch.Tensor]) -> ConvSNN:
    model = ConvSNN.from_config(cfg.model, (1, 28, 28))
    model.load_state_dict(weights)
    return model


def evaluated(cfg: DictConfig, weights: dict[str, torch.Tensor], split: Split) -> tuple[float, float, float]:
    """The accuracy, loss and spikes per sample snn_train.evaluation gives for these weights on a split, as training
    configures it."""
    encoder, train = build_encoder(cfg.encoder, cfg.seq_length), cfg.train
    counts = evaluation.evaluate(
        network(cfg, weights),
        encoder,
        split,
        cfg.decoder,
        train.eval_batch_size,
        train.limit_batches,
        train.precision,
        train.seed,
    )
    return counts.accuracy, counts.loss, counts.spikes_per_sample


def test_the_average_follows_its_formula_from_a_copy_of_the_first_steps_weights(steps: list[Path]) -> None:
    states = [checkpoint(run_dir) for run_dir in steps]
    raw = [state["model"] for state in states]
    expected = by_hand(raw, DECAY)
    first = averaged(states[0])
    assert all(torch.equal(first[key], raw[0][key]) for key in raw[0])  # n_averaged = 0: w_ema = w
    for state, average in zip(states, expected):
        assert state["average"]["n_averaged"] == state["loop"]["step"]
        for key, value in average.items():
            torch.testing.assert_close(averaged(state)[key], value, msg=key)
    assert not torch.allclose(expected[-1]["convs.0.weight"], raw[-1]["convs.0.weight"])
    assert not torch.allclose(expected[-1]["norms.0.running_mean"], raw[-1]["norms.0.running_mean"])

    best = checkpoint(steps[-1], "best.pt")  # the average at the best validation's step
    for key, value in expected[best["loop"]["step"] - 1].items():
        torch.testing.assert_close(best["model"][key], value, msg=key)


def test_validations_and_the_test_evaluate_the_average_not_the_weights_trained(
    steps: list[Path], tiny_overrides: list[str]
) -> None:
    run_dir = steps[-1]
    cfg = load_config([*tiny_overrides, *AVERAGED, "train.limit_batches=3"])
    _, val_set = hold_out(load_split(cfg.data, train=True, seq_length=cfg.seq_length), 16, 0)
    test_set = load_split(cfg.data, train=False, seq_length=cfg.seq_length)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    state = checkpoint(run_dir)

    def figures(entry: dict, prefix: str = "") -> tuple[float, float, float]:
        return entry[f"{prefix}accuracy"], entry[f"{prefix}loss"], entry[f"{prefix}spikes_per_sample"]

    best = [v for v in metrics["validations"] if v["step"] == metrics["final"]["best_step"]][0]
    assert evaluated(cfg, checkpoint(run_dir, "best.pt")["model"], val_set) == figures(best)
    last = evaluated(cfg, averaged(state), val_set)
    assert last == figures(metrics["validations"][-1])
    assert evaluated(cfg, state["model"], val_set) != last  # the raw weights' figures differ
    # train.test_on=last: the average at the last step
    assert evaluated(cfg, averaged(state), test_set) == figures(metrics["final"], "test_")


def test_snn_eval_of_last_pt_evaluates_the_average_as_training_tested_it(
    tmp_path: Path, tiny_overrides: list[str]
) -> None:
    # Without a validation split there is no best.pt: training tests the average, and so does snn-eval on last.pt.
    progress = fit(load_config([*tiny_overrides, *AVERAGED, "data.val_size=0", "train.limit_batches=2"]), tmp_path)
    report = evaluate_checkpoint(compose("eval", ["device=cpu", f"checkpoint={tmp_path}", "batch_size=24"]))
    assert report["checkpoint"].endswith("last.pt")
    assert (report["accuracy"], report["loss"]) == (progress.final.test_accuracy, progress.final.test_loss)


def test_a_skipped_batch_does_not_move_the_average(tmp_path: Path, tiny_overrides: list[str]) -> None:
    # Adam's first steps move every weight by about lr: with lr=1e37 steps 1 and 2 are finite, steps 3 and 4 NaN.
    exploding = [*tiny_overrides, "optim.lr=1e37", "scheduler=none", f"train.ema_decay={DECAY}"]
    fit(load_config([*exploding, "train.limit_batches=2"]), tmp_path / "two")
    fit(load_config([*exploding, "train.limit_batches=4", "train.on_nan=skip"]), tmp_path / "skip")
    after_two, after_four = checkpoint(tmp_path / "two")["average"], checkpoint(tmp_path / "skip")["average"]
    assert after_four["n_averaged"] == 2
    assert all(torch.equal(after_two[key], after_four[key]) for key in after_two)


def test_a_run_interrupted_and_resumed_averages_exactly_like_one_never_interrupted(
    tmp_path: Path, tiny_overrides: list[str]
) -> None:
    # Poisson input, so every random draw counts; stopped by SIGINT after step 2 of 4 (mid-epoch), then resumed.
    overrides = [*tiny_overrides, *AVERAGED, "encoder=poisson", "train.limit_batches=4"]
    whole = fit(load_config(overrides), tmp_path / "whole")
    calls = []

    def interrupt_at_step_2(*_: object) -> None:
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)

    handle = register_optimizer_step_post_hook(interrupt_at_step_2)
    try:
        with pytest.raises(Interrupted, match="interrupted at step 2"):
            fit(load_config(overrides), tmp_path / "resumed")
    finally:
        handle.remove()
    resumed = fit(load_config([*overrides, f"train.resume={tmp_path / 'resumed'}"]), tmp_path / "resumed")

    assert resumed.validations == whole.validations
    assert (resumed.final.test_loss, resumed.final.best_step) == (whole.final.test_loss, whole.final.best_step)
    for name, entry in (("last.pt", "model"), ("last.pt", "average"), ("best.pt", "model")):
        expected, actual = checkpoint(tmp_path / "whole", name)[entry], checkpoint(tmp_path / "resumed", name)[entry]
        assert expected.keys() == actual.keys() and all(torch.equal(actual[k], expected[k]) for k in expected), entry


def test_resuming_a_run_without_the_average_with_one_is_refused_in_one_line(
    tmp_path: Path, tiny_overrides: list[str]
) -> None:
    plain = [*tiny_overrides, "train.limit_batches=1"]
    fit(load_config(plain), tmp_path)
    cfg = load_config([*plain, f"train.ema_decay={DECAY}", f"train.resume={tmp_path}"])
    with pytest.raises(ConfigError, match=re.escape(f"different config: train.ema_decay (None → {DECAY})")):
        fit(cfg, tmp_path)
