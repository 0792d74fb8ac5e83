"""The training loop: from a validated config to metrics, checkpoints and event files, resumable at any step.

The learning problem it runs (network, loss, optimizer, schedule) is task.py's; the evaluation, evaluation.py's.
With a validation split, the loop validates every log.val_every_n_steps and at each epoch end, keeps the best weights
in best.pt, may stop early, and evaluates the test set once, at the end; without one, it tests after every epoch.
With train.ema_decay, every evaluation (validations, best.pt, the tests) is of the moving average of the weights,
updated after each step that updates them; the train loss and accuracy stay those of the weights trained.
"""

from __future__ import annotations

import copy
import logging
import math
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from snn_train import distributed
from snn_train.checkpoint import BEST, LAST, load_checkpoint, save_best, save_checkpoint
from snn_train.data import Split, batch_indices
from snn_train.errors import Interrupted, TrainingError
from snn_train.evaluation import evaluate, sample_forward
from snn_train.model import ConvSNN, LayerTrace
from snn_train.progress import EpochMetrics, Evaluation, FinalMetrics, Progress, write_metrics
from snn_train.schema import Config
from snn_train.start import Run, start_run
from snn_train.task import autocast, decode, encoded_shard, objective
from snn_train.tensorboard import RunLogger

log = logging.getLogger(__name__)


@contextmanager
def stop_requests() -> Iterator[list[int]]:
    """Record SIGINT and SIGTERM instead of dying, so the loop can checkpoint at the next step boundary and stop."""
    requested: list[int] = []
    previous = {
        signum: signal.signal(signum, lambda s, _: requested.append(s)) for signum in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield requested
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def save(run: Run, data_order: torch.Tensor) -> None:
    """Checkpoint the run (rank 0 writes it), unless its weights are no longer finite: then the last good
    checkpoint stays."""
    folder = run.run_dir / "checkpoints"
    if not all(torch.isfinite(p).all() for p in run.model.parameters()):
        raise TrainingError(
            f"the weights are no longer finite at step {run.progress.step}; "
            f"stopped, keeping the checkpoints in {folder}"
        )
    run.progress.wall_s = time.perf_counter() - run.started
    if run.logger is not None:
        run.logger.flush()  # the event files hold every step up to the checkpoint; a resume purges later ones
        save_checkpoint(
            folder, run.model, run.optimizer, run.scheduler, run.average, run.cfg, data_order, asdict(run.progress)
        )
    distributed.barrier()


def interrupted(run: Run, signum: int) -> Interrupted:
    """The stop after a checkpoint, with how to continue."""
    saved = run.run_dir / "checkpoints" / LAST
    return Interrupted(
        signum, f"interrupted at step {run.progress.step}: saved {saved}; continue with train.resume={run.run_dir}"
    )


def train_step(
    run: Run, index: torch.Tensor, epoch: int, unchecked: list[tuple[int, int, torch.Tensor]]
) -> torch.Tensor | None:
    """Forward, backward, update; returns the batch's summed loss and correct predictions over all ranks, or None for
    a batch skipped for its non-finite loss.

    Each rank takes its share of the batch; gradients are averaged over the ranks, so each rank's loss is its share's
    summed loss over the batch's mean share size: the update is that of the whole batch in one process, shares of
    unequal size (a batch that does not split evenly) included.

    Under train.on_nan=stop the loss joins ``unchecked`` (step, batch, loss), checked at the next ``check_losses``
    (logging, a checkpoint, the epoch's end), so a step need not wait for its result; train.on_nan=skip must know before
    the update, so it checks every step.
    """
    cfg, step = run.cfg, run.progress.step
    encoded, labels = encoded_shard(run.encoder, run.train_set, index, cfg.augment)
    logged, histograms = step % cfg.log.every_n_steps == 0, step % cfg.log.histogram_every_n_steps == 0
    trace: dict[str, LayerTrace] | None = {} if run.logger is not None and (logged or histograms) else None
    with autocast(labels.device, cfg.train.precision):
        # voltages and full spikes only for histograms: a logged step's spike rates come from the kernels' counts
        voltages = run.trained(encoded, trace, record_voltage=histograms, keep_spikes=histograms)
        logits = decode(voltages, cfg.decoder)
    loss_sum = objective(voltages, logits, labels, cfg.loss)
    sums = distributed.sum_over_ranks(
        torch.stack([loss_sum.detach().float(), (logits.argmax(1) == labels).sum().float()])
    )
    loss = sums[0] / len(index)
    if cfg.train.on_nan == "skip" and not bool(torch.isfinite(loss)):
        skip(run, loss)
        return None
    run.optimizer.zero_grad(set_to_none=True)
    (loss_sum * (distributed.world_size() / len(index))).backward()
    if cfg.train.grad_clip is not None:
        nn.utils.clip_grad_norm_(run.model.parameters(), cfg.train.grad_clip)
    run.optimizer.step()
    if run.average is not None:
        run.average.update_parameters(run.model)
    if run.scheduler is not None:
        run.scheduler.step()
    if cfg.train.on_nan == "stop":
        unchecked.append((step, run.progress.batch, loss))
    if logged or histograms:
        check_losses(run, unchecked, epoch)
    if trace is not None:
        run.logger.spike_statistics(step, encoded, trace, histograms)
    return sums


def skip(run: Run, loss: torch.Tensor) -> None:
    """Count and report a batch skipped for its non-finite loss (train.on_nan=skip)."""
    run.progress.skipped += 1
    log.warning(
        "loss is %s at step %d: batch skipped, no update (%d so far)",
        loss.item(),
        run.progress.step,
        run.progress.skipped,
    )
    if run.logger is not None:
        run.logger.scalars(run.progress.step, {"NaN/skipped_batches": run.progress.skipped})


def check_losses(run: Run, unchecked: list[tuple[int, int, torch.Tensor]], epoch: int) -> None:
    """Stop at the first non-finite loss among the steps not yet checked (one wait for all of them), before anything
    logs or saves them; the checkpoints stay those written before it."""
    finite = torch.isfinite(torch.stack([loss for *_, loss in unchecked])) if unchecked else None
    if finite is not None and not bool(finite.all()):
        step, batch, loss = unchecked[int((~finite).nonzero()[0])]
        raise TrainingError(
            f"loss is {loss.item()} at step {step} (epoch {epoch}, batch {batch}); stopped, keeping the checkpoints "
            f"in {run.run_dir / 'checkpoints'}; try a lower optim.lr, train.grad_clip, or train.on_nan=skip"
        )
    unchecked.clear()


def train_epoch(run: Run, epoch: int, stop: list[int]) -> None:
    """The epoch's remaining batches, checkpointing every train.checkpoint_every_n_steps, and on a stop request
    before stopping."""
    cfg, progress = run.cfg, run.progress
    if progress.epoch != epoch:
        progress.epoch, progress.batch = epoch, 0
    epoch_start = time.perf_counter() - progress.epoch_s
    epoch_order = run.data_order.get_state()  # a mid-epoch checkpoint draws this epoch's order again from it
    loss_sum = torch.tensor(progress.loss_sum, device=run.train_set.labels.device)
    correct = torch.tensor(progress.correct, device=run.train_set.labels.device)
    batches = list(batch_indices(len(run.train_set), cfg.train.batch_size, run.data_order, cfg.train.limit_batches))
    show = cfg.log.progress_bar and run.logger is not None
    bar = tqdm(total=len(batches), initial=progress.batch, desc=f"epoch {epoch}/{cfg.train.epochs}", disable=not show)
    unchecked: list[tuple[int, int, torch.Tensor]] = []
    for index in batches[progress.batch :]:
        progress.step += 1
        progress.batch += 1
        sums = train_step(run, index, epoch, unchecked)
        if sums is not None:
            loss_sum += sums[0]
            correct += sums[1].long()
            progress.seen += len(index)
        bar.update()
        if run.logger is not None:
            log_progress(run, run.logger, loss_sum, correct, epoch_start, bar)
        if validation_due(run, len(batches)):
            check_losses(run, unchecked, epoch)
            validate(run)
            if patience_spent(run):
                break  # early stopping: the epoch ends here, and end_epoch checkpoints it
        signum = stop_signal(stop)
        # Not at the epoch's last batch: the epoch-end checkpoint follows, after events logged at this same step.
        if signum or (progress.step % cfg.train.checkpoint_every_n_steps == 0 and progress.batch < len(batches)):
            check_losses(run, unchecked, epoch)
            tally(progress, loss_sum, correct, epoch_start)
            save(run, epoch_order)
        if signum:
            raise interrupted(run, signum)
    bar.close()
    check_losses(run, unchecked, epoch)
    tally(progress, loss_sum, correct, epoch_start)


def log_progress(
    run: Run, logger: RunLogger, loss_sum: torch.Tensor, correct: torch.Tensor, epoch_start: float, bar: tqdm
) -> None:
    """The running train loss and accuracy every log.every_n_steps (bar and TensorBoard), parameters every
    log.histogram_every_n_steps."""
    cfg, progress = run.cfg, run.progress
    if progress.step % cfg.log.every_n_steps == 0 and progress.seen:
        train_loss, train_accuracy = loss_sum.item() / progress.seen, correct.item() / progress.seen
        samples_per_s = progress.seen / (time.perf_counter() - epoch_start)
        bar.set_postfix(loss=f"{train_loss:.4f}", acc=f"{train_accuracy:.4f}", samples_s=f"{samples_per_s:.0f}")
        logger.scalars(progress.step, train_scalars(run, train_loss, train_accuracy))
    if progress.step % cfg.log.histogram_every_n_steps == 0:
        logger.parameters(progress.step, run.model)


def stop_signal(stop: list[int]) -> int:
    """The signal (SIGINT, SIGTERM) that stops the run after this step, or 0; every rank agrees, so all stop at
    one step."""
    return distributed.max_over_ranks(stop[0] if stop else 0)


def tally(progress: Progress, loss_sum: torch.Tensor, correct: torch.Tensor, epoch_start: float) -> None:
    """Copy the epoch's running sums and time into ``progress`` (for a checkpoint or the epoch's metrics)."""
    progress.loss_sum, progress.correct, progress.epoch_s = (
        loss_sum.item(),
        int(correct.item()),
        time.perf_counter() - epoch_start,
    )


def end_epoch(run: Run, epoch: int) -> None:
    """Validate (unless done at this step) or, without a validation split, test; log, record the epoch's metrics
    (resetting the running sums), checkpoint and write metrics.json."""
    progress = run.progress
    if run.val_set is None:
        val, test = None, evaluation(run, run.evaluated, run.test_set)
    else:
        if not progress.validations or progress.validations[-1].step != progress.step:
            validate(run)
        val, test = progress.validations[-1], None
    seen = progress.seen
    metrics = EpochMetrics(
        epoch=epoch,
        step=progress.step,
        train_loss=progress.loss_sum / seen if seen else math.nan,
        train_accuracy=progress.correct / seen if seen else math.nan,
        **figures("val", val),
        **figures("test", test),
        samples_per_s=seen / progress.epoch_s,
        wall_s=time.perf_counter() - run.started,
    )
    if run.logger is not None:
        log_epoch(run, run.logger, metrics)
    run.progress = replace(progress, loss_sum=0.0, correct=0, seen=0, epoch_s=0.0, history=[*progress.history, metrics])
    save(run, run.data_order.get_state())
    if run.logger is not None:
        write_metrics(run.run_dir / "metrics.json", run.progress)
    shown = ("val", val) if val is not None else ("test", test)
    log.info(
        "epoch %d: train loss %.4f acc %.4f | %s loss %.4f acc %.4f, %.0f spikes/sample | %.0f samples/s",
        epoch,
        metrics.train_loss,
        metrics.train_accuracy,
        shown[0],
        shown[1].loss,
        shown[1].accuracy,
        shown[1].spikes_per_sample,
        metrics.samples_per_s,
    )


def figures(split: str, result: Evaluation | None) -> dict[str, float | None]:
    """An evaluation's loss, accuracy and spikes per sample as EpochMetrics' ``<split>_*`` fields (None if there
    was none)."""
    return {
        f"{split}_loss": result.loss if result is not None else None,
        f"{split}_accuracy": result.accuracy if result is not None else None,
        f"{split}_spikes_per_sample": result.spikes_per_sample if result is not None else None,
    }


def log_epoch(run: Run, logger: RunLogger, metrics: EpochMetrics) -> None:
    """The epoch's train figures (unless logged at this step), test figures (without a validation split; validations
    log their own), and sample 0's readout traces and input raster (of the validation split, else the test set), so
    epochs can be compared."""
    step = metrics.step
    if step % run.cfg.log.every_n_steps != 0:
        logger.scalars(step, train_scalars(run, metrics.train_loss, metrics.train_accuracy))
    if metrics.test_accuracy is not None:
        logger.scalars(
            step,
            {
                "Loss/test": metrics.test_loss,
                "Accuracy/test": metrics.test_accuracy,
                "Spikes/test_per_sample": metrics.test_spikes_per_sample,
            },
        )
    name, split = ("validation", run.val_set) if run.val_set is not None else ("test", run.test_set)
    encoded, voltages, _ = sample_forward(run.evaluated, run.encoder, split, 1)
    logger.readout_traces(step, voltages[:, 0], int(split.labels[0]), f"{name} sample 0")
    logger.input_raster(step, encoded[:, 0], f"{name} sample 0")


def train_scalars(run: Run, loss: float, accuracy: float) -> dict[str, float]:
    """The running train loss and accuracy, and the learning rate, as TensorBoard scalars."""
    return {"Loss/train": loss, "Accuracy/train": accuracy, "LR": run.optimizer.param_groups[0]["lr"]}


def evaluation(run: Run, model: ConvSNN, split: Split) -> Evaluation:
    """``model`` evaluated on ``split`` (at most train.limit_batches batches, each rank its shares), at this step."""
    cfg, progress = run.cfg, run.progress
    counts = evaluate(
        model,
        run.encoder,
        split,
        cfg.decoder,
        cfg.train.eval_batch_size,
        cfg.train.limit_batches,
        cfg.train.precision,
        cfg.train.seed,
    )
    return Evaluation(progress.epoch, progress.step, counts.loss, counts.accuracy, counts.spikes_per_sample)


def validation_due(run: Run, batches: int) -> bool:
    """Whether to validate after this step: every log.val_every_n_steps (never if null), except at the epoch's last
    batch (of ``batches``), whose validation end_epoch does."""
    progress, every = run.progress, run.cfg.log.val_every_n_steps
    return run.val_set is not None and every is not None and progress.step % every == 0 and progress.batch < batches


def validate(run: Run) -> None:
    """Evaluate the validation split; log it and write metrics.json; write best.pt if its accuracy is the best so far,
    else count it towards early stopping."""
    progress = run.progress
    result = evaluation(run, run.evaluated, run.val_set)
    progress.validations.append(result)
    if progress.best is None or result.accuracy > progress.best.accuracy:
        progress.best, progress.stale = result, 0
        if run.logger is not None:
            save_best(run.run_dir / "checkpoints", run.evaluated, run.cfg, asdict(result))
        distributed.barrier()  # best.pt is on disk for every rank
    else:
        progress.stale += 1
    if run.logger is not None:
        run.logger.scalars(
            result.step,
            {
                "Loss/val": result.loss,
                "Accuracy/val": result.accuracy,
                "Spikes/val_per_sample": result.spikes_per_sample,
            },
        )
        write_metrics(run.run_dir / "metrics.json", progress)
    best = progress.best
    log.info(
        "step %d: validation loss %.4f acc %.4f | best %.4f at step %d, %d validation(s) since",
        result.step,
        result.loss,
        result.accuracy,
        best.accuracy,
        best.step,
        progress.stale,
    )


def patience_spent(run: Run) -> bool:
    """Whether early stopping ends the run: train.early_stopping_patience validations in a row brought no better
    validation accuracy."""
    patience = run.cfg.train.early_stopping_patience
    return patience is not None and run.progress.stale >= patience


def early_stop_reason(run: Run) -> str | None:
    """Why the run stopped before train.epochs, or None if it did not stop early."""
    if not patience_spent(run):
        return None
    best = run.progress.best
    return (
        f"no better validation accuracy in {run.progress.stale} validations "
        f"(train.early_stopping_patience) since step {best.step}'s {best.accuracy:.4f}"
    )


def best_weights(run: Run) -> ConvSNN:
    """A copy of the evaluated network holding best.pt's weights, so it computes as that network does (its kernels,
    device, layout) and draws nothing from the random states; every rank reads the file rank 0 wrote."""
    model = copy.deepcopy(run.evaluated)
    model.load_state_dict(load_checkpoint(run.run_dir / "checkpoints" / BEST, run.test_set.labels.device)["model"])
    return model


def final_test(run: Run) -> None:
    """The run's final figures into ``run.progress.final`` and metrics.json: the test set evaluated once, on the
    weights train.test_on names, logged and checkpointed; without a validation split, the last epoch's test."""
    cfg, progress = run.cfg, run.progress
    if run.val_set is None:
        last = progress.history[-1]
        test = Evaluation(last.epoch, last.step, last.test_loss, last.test_accuracy, last.test_spikes_per_sample)
        progress.final = final_metrics(run, "last", test, last.wall_s)
    elif progress.final is None or progress.final.test_on != cfg.train.test_on:
        best = cfg.train.test_on == "best"
        test = evaluation(run, best_weights(run) if best else run.evaluated, run.test_set)
        tested = progress.best if best else test
        test = replace(test, epoch=tested.epoch, step=tested.step)
        progress.final = final_metrics(run, cfg.train.test_on, test, time.perf_counter() - run.started)
        if run.logger is not None:
            run.logger.test_result(progress.final)
        save(run, run.data_order.get_state())
    if run.logger is not None:
        write_metrics(run.run_dir / "metrics.json", progress)


def final_metrics(run: Run, weights: str, test: Evaluation, wall_s: float) -> FinalMetrics:
    """The run's last epoch, best validation, early stop and ``test``, the evaluation of the ``weights`` tested."""
    last, best = run.progress.history[-1], run.progress.best
    return FinalMetrics(
        epoch=last.epoch,
        step=last.step,
        train_loss=last.train_loss,
        train_accuracy=last.train_accuracy,
        samples_per_s=last.samples_per_s,
        wall_s=wall_s,
        best_val_accuracy=best.accuracy if best is not None else None,
        best_val_loss=best.loss if best is not None else None,
        best_epoch=best.epoch if best is not None else None,
        best_step=best.step if best is not None else None,
        stopped_early=early_stop_reason(run),
        test_on=weights,
        test_epoch=test.epoch,
        test_step=test.step,
        test_loss=test.loss,
        test_accuracy=test.accuracy,
        test_spikes_per_sample=test.spikes_per_sample,
    )


def fit(cfg: Config, run_dir: Path) -> Progress:
    """Train ``cfg``'s network (or continue ``train.resume``'s run) and test it; returns where the run ends: its
    epochs, validations, best validation and final figures (``final``).

    Raises TrainingError on a non-finite loss (train.on_nan=stop) and Interrupted after SIGINT/SIGTERM.
    """
    return complete(start_run(cfg, run_dir))


def complete(run: Run) -> Progress:
    """Run ``run``'s remaining epochs and the final test (as ``fit``), leaving the last weights in ``run.model``."""
    cfg = run.cfg
    try:
        with stop_requests() as stop:
            first = run.progress.epoch + (len(run.progress.history) == run.progress.epoch)  # the next one if finished
            for epoch in range(first, cfg.train.epochs + 1):
                if patience_spent(run):
                    break
                run.progress.final = None  # training goes on: the test follows again at the end
                train_epoch(run, epoch, stop)
                end_epoch(run, epoch)
                signum = stop_signal(stop)
                if signum:  # it came during the evaluation: the epoch's checkpoint is written
                    raise interrupted(run, signum)
            final_test(run)
        final = run.progress.final
        if run.logger is not None:
            run.logger.hparams(cfg, hparam_metrics(final))
    finally:
        if run.logger is not None:
            run.logger.close()
    if final.stopped_early is not None:
        log.info("stopped early at step %d: %s", final.step, final.stopped_early)
    tested = f"step {final.test_step}" + (
        f", validation accuracy {final.best_val_accuracy:.4f}" if final.test_on == "best" else ""
    )
    log.info(
        "final test accuracy %.4f (loss %.4f) of the %s weights (%s), after %d steps in %.1f s",
        final.test_accuracy,
        final.test_loss,
        final.test_on,
        tested,
        final.step,
        final.wall_s,
    )
    return run.progress


def hparam_metrics(final: FinalMetrics) -> dict[str, float]:
    """The HParams dashboard's metrics: the test figures, and the best validation accuracy if there is one."""
    metrics = {"hparam/test_accuracy": final.test_accuracy, "hparam/test_loss": final.test_loss}
    if final.best_val_accuracy is not None:
        metrics["hparam/val_accuracy"] = final.best_val_accuracy
    return metrics
