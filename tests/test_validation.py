"""The validation split, the validation schedule, best.pt, early stopping and the one test at the end, against closed
forms and independent forward passes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.optim.optimizer import register_optimizer_step_post_hook

from snn_train import ConvSNN, load_config
from snn_train.checkpoint import load_checkpoint
from snn_train.data import Split, hold_out, load_split, stratified_counts, to_unit_interval
from snn_train.encoders import build_encoder
from snn_train.errors import ConfigError
from snn_train.start import start_run
from snn_train.task import build_optimizer, decode
from snn_train.train import fit

# A network that learns on the tiny data (20 of its 96 training images held out), validated after every step: its
# validation accuracy peaks at step 5 of 10 (0.3, 0.4, 0.55, 0.55, 0.8, then 0.8 five times), then stays there.
LEARNING = [
    "seq_length=8",
    "model.lif.alpha=10",
    "encoder.input_scale=5",
    "decoder=mean",
    "optim.lr=5e-3",
    "data.val_size=20",
    "log.val_every_n_steps=1",
]
MNIST_TRAIN_CLASSES = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]  # images per class in MNIST


def indexed_split(labels: list[int]) -> Split:
    """A split whose image n holds n (two bytes), so the samples of any part of it can be told apart."""
    n = torch.arange(len(labels))
    images = torch.stack([n % 256, n // 256], 1).to(torch.uint8).reshape(-1, 1, 2)
    return Split(images, torch.tensor(labels))


def indices(split: Split) -> list[int]:
    return (split.images[:, 0, 0].long() + 256 * split.images[:, 0, 1].long()).tolist()


def test_each_class_gets_its_share_of_the_validation_split_rounded_down_or_up() -> None:
    sizes = torch.tensor(MNIST_TRAIN_CLASSES)
    counts = stratified_counts(sizes, 5000)
    shares = [n * 5000 / 60000 for n in MNIST_TRAIN_CLASSES]
    assert int(counts.sum()) == 5000
    assert all(int(share) <= count <= int(share) + 1 for share, count in zip(shares, counts.tolist()))
    # The remainder (5000 - sum of the shares rounded down) goes to the classes with the largest fractions.
    rounded_up = {k for k, (share, count) in enumerate(zip(shares, counts.tolist())) if count > int(share)}
    by_fraction = sorted(range(10), key=lambda k: shares[k] - int(shares[k]), reverse=True)
    assert rounded_up == set(by_fraction[: 5000 - sum(int(share) for share in shares)])
    assert stratified_counts(torch.tensor([3, 0, 5, 2]), 5).tolist() == [2, 0, 2, 1]  # shares 1.5, 0, 2.5, 1


def test_the_split_is_stratified_disjoint_and_drawn_from_its_own_seed() -> None:
    labels = [0] * 50 + [1] * 30 + [2] * 13 + [3] * 7  # unbalanced, in blocks
    split = indexed_split(labels)
    rest, held = hold_out(split, 20, seed=0)
    kept, taken = indices(rest), indices(held)
    assert sorted(kept + taken) == list(range(100)) and not set(kept) & set(taken)
    assert kept == sorted(kept) and taken == sorted(taken)  # each part in the split's order
    assert torch.bincount(held.labels).tolist() == [10, 6, 3, 1]  # 20 % of 50, 30, 13 (2.6), 7 (1.4)
    assert held.labels.tolist() == [labels[n] for n in taken]
    assert torch.equal(hold_out(split, 20, seed=0)[1].images, held.images)
    assert indices(hold_out(split, 20, seed=1)[1]) != taken
    first_of_class = [taken[0], *(taken[k] for k in range(1, 20) if labels[taken[k]] != labels[taken[k - 1]])]
    assert first_of_class != [0, 50, 80, 93]  # drawn at random within each class, not the first ones


def test_train_seed_does_not_move_the_split_and_split_seed_does(tmp_path: Path, tiny_overrides: list[str]) -> None:
    def split_of(*overrides: str) -> list[int]:
        run = start_run(load_config([*tiny_overrides, "data.val_size=20", *overrides]), tmp_path / str(overrides))
        run.logger.close()
        assert len(run.train_set) == 76 and torch.bincount(run.val_set.labels).tolist() == [2] * 10
        return run.val_set.images.flatten(1).sum(1).tolist()  # the images' sums identify them (noise)

    assert split_of("train.seed=0") == split_of("train.seed=5")
    assert split_of("data.split_seed=1") != split_of("data.split_seed=0")


def test_a_validation_split_as_big_as_the_training_set_is_refused(tmp_path: Path, tiny_overrides: list[str]) -> None:
    with pytest.raises(
        ConfigError, match=re.escape("data.val_size=96 must be smaller than the mnist training set (96")
    ):
        fit(load_config([*tiny_overrides, "data.val_size=96"]), tmp_path)


def scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return [(s.step, s.value) for s in events.Scalars(tag)]


# 80 training images in 5 batches of 16: every 2 steps, validations after steps 2, 4, 5 (epoch 1's end), 6, 8 and 10
# (epoch 2's); with null, at the epoch ends only.
@pytest.mark.parametrize(("every", "expected", "ends"), [("2", [2, 4, 5, 6, 8, 10], (2, 5)), ("null", [5, 10], (0, 1))])
def test_validation_every_n_steps_and_at_each_epoch_end_and_the_test_once(
    tmp_path: Path, tiny_overrides: list[str], every: str, expected: list[int], ends: tuple[int, int]
) -> None:
    progress = fit(
        load_config([*tiny_overrides, "data.val_size=16", f"log.val_every_n_steps={every}", "train.epochs=2"]),
        tmp_path,
    )
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    steps = [v["step"] for v in metrics["validations"]]
    assert steps == expected == [v.step for v in progress.validations]
    assert scalars(tmp_path, "Accuracy/val") == [
        (v["step"], pytest.approx(v["accuracy"])) for v in metrics["validations"]
    ]
    assert [s for s, _ in scalars(tmp_path, "Loss/val")] == steps
    for epoch, end in zip(metrics["epochs"], ends):
        assert epoch["val_accuracy"] == metrics["validations"][end]["accuracy"] and epoch["test_accuracy"] is None
    final = metrics["final"]
    assert final["test_on"] == "best" and final["test_step"] == final["best_step"]
    assert scalars(tmp_path, "Accuracy/test") == [(final["best_step"], pytest.approx(final["test_accuracy"]))]
    assert final["best_val_accuracy"] == max(v["accuracy"] for v in metrics["validations"])


def accuracy(model: ConvSNN, overrides: list[str], split: Split) -> float:
    """The model's accuracy on a whole split in one forward pass of its own (the direct encoder draws no noise)."""
    cfg = load_config(overrides)
    model.eval()
    with torch.no_grad():
        voltages = model(build_encoder(cfg.encoder, cfg.seq_length)(to_unit_interval(split.images)))
    return (decode(voltages, cfg.decoder).argmax(1) == split.labels).float().mean().item()


def network(overrides: list[str], file: Path) -> ConvSNN:
    model = ConvSNN.from_config(load_config(overrides).model, (1, 28, 28))
    model.load_state_dict(load_checkpoint(file)["model"])
    return model


@pytest.mark.parametrize("test_on", ["best", "last"])
def test_best_pt_holds_the_weights_of_the_best_validation_and_the_test_is_of_the_chosen_weights(
    tmp_path: Path, tiny_overrides: list[str], test_on: str
) -> None:
    overrides = [*tiny_overrides, *LEARNING, "train.epochs=2", f"train.test_on={test_on}"]
    weights = []  # after each step, in the optimizer's order
    handle = register_optimizer_step_post_hook(
        lambda optimizer, *_: weights.append([p.detach().clone() for g in optimizer.param_groups for p in g["params"]])
    )
    try:
        progress = fit(load_config(overrides), tmp_path)
    finally:
        handle.remove()
    accuracies = [v.accuracy for v in progress.validations]
    best_step = accuracies.index(max(accuracies)) + 1  # the first of equals
    assert (best_step, len(weights)) == (5, 10)

    best = network(overrides, tmp_path / "checkpoints" / "best.pt")
    saved = [p for g in build_optimizer(best, load_config(overrides).optim).param_groups for p in g["params"]]
    assert all(torch.equal(a, b) for a, b in zip(saved, weights[best_step - 1]))
    assert not all(torch.equal(a, b) for a, b in zip(saved, weights[-1]))
    assert load_checkpoint(tmp_path / "checkpoints" / "best.pt")["loop"]["step"] == best_step

    cfg = load_config(overrides)
    _, val_set = hold_out(load_split(cfg.data, train=True, seq_length=cfg.seq_length), 20, 0)
    test_set = load_split(cfg.data, train=False, seq_length=cfg.seq_length)
    assert accuracy(best, overrides, val_set) == pytest.approx(progress.best.accuracy)
    tested = best if test_on == "best" else network(overrides, tmp_path / "checkpoints" / "last.pt")
    final = progress.final
    assert (final.test_on, final.test_step) == (test_on, best_step if test_on == "best" else 10)
    assert final.test_accuracy == pytest.approx(accuracy(tested, overrides, test_set))


def test_early_stopping_stops_after_exactly_patience_validations_without_improvement(
    tmp_path: Path, tiny_overrides: list[str]
) -> None:
    # A silent network (the defaults on this data) reads out zeros: the same accuracy at every validation, so the
    # first is the best and the run stops at the validation after step 1 + patience, mid-epoch, checkpointed there.
    silent = [*tiny_overrides, "data.val_size=20", "log.val_every_n_steps=1", "train.early_stopping_patience=3"]
    progress = fit(load_config([*silent, "train.epochs=2"]), tmp_path / "silent")
    assert len({v.accuracy for v in progress.validations}) == 1
    assert [v.step for v in progress.validations] == [1, 2, 3, 4] and progress.stale == 3
    assert (progress.final.step, progress.final.best_step, progress.history[-1].step) == (4, 1, 4)
    assert load_checkpoint(tmp_path / "silent" / "checkpoints" / "last.pt")["loop"]["step"] == 4
    assert progress.final.stopped_early == (
        "no better validation accuracy in 3 validations (train.early_stopping_patience) since step 1's 0.1000"
    )

    # A learning run, patience 2: the rule applied by hand to its validation accuracies says where it stops.
    progress = fit(
        load_config([*tiny_overrides, *LEARNING, "train.epochs=2", "train.early_stopping_patience=2"]),
        tmp_path / "learning",
    )
    accuracies, best, stale, resets, stop = [v.accuracy for v in progress.validations], -1.0, 0, 0, None
    for n, value in enumerate(accuracies):
        resets += value > best and stale > 0
        best, stale = (value, 0) if value > best else (best, stale + 1)
        if stale == 2:
            stop = n
            break
    assert stop == len(accuracies) - 1 and resets > 0  # stopped at the first 2 in a row, after a count that reset
    assert progress.final.step == progress.validations[-1].step < 10


def test_a_run_stopped_early_stays_stopped_unless_the_patience_grows(tmp_path: Path, tiny_overrides: list[str]) -> None:
    overrides = [*tiny_overrides, "data.val_size=20", "log.val_every_n_steps=1", "train.epochs=2"]
    fit(load_config([*overrides, "train.early_stopping_patience=1"]), tmp_path)
    again = fit(load_config([*overrides, "train.early_stopping_patience=1", f"train.resume={tmp_path}"]), tmp_path)
    assert again.final.step == 2 and len(again.validations) == 2
    longer = fit(load_config([*overrides, "train.early_stopping_patience=4", f"train.resume={tmp_path}"]), tmp_path)
    assert [v.step for v in longer.validations] == [1, 2, 3, 4, 5] and longer.final.stopped_early is not None


def test_a_finished_run_continued_for_another_epoch_is_the_two_epoch_run(
    tmp_path: Path, tiny_overrides: list[str]
) -> None:
    # Poisson input, so every random draw counts; a constant rate, so one epoch's schedule is the first of two.
    overrides = [*tiny_overrides, *LEARNING, "encoder=poisson", "scheduler=none", "train.limit_batches=2"]
    run_dir = tmp_path / "continued"
    fit(load_config([*overrides, "train.epochs=1"]), run_dir)
    continued = fit(load_config([*overrides, "train.epochs=2", f"train.resume={run_dir}"]), run_dir)
    whole = fit(load_config([*overrides, "train.epochs=2"]), tmp_path / "whole")
    assert continued.validations == whole.validations and continued.final.test_loss == whole.final.test_loss
    for name in ("last.pt", "best.pt"):
        expected = load_checkpoint(tmp_path / "whole" / "checkpoints" / name)["model"]
        actual = load_checkpoint(run_dir / "checkpoints" / name)["model"]
        assert all(torch.equal(actual[key], expected[key]) for key in expected), name
