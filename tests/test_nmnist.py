"""N-MNIST: recordings written in the dataset's own format, frames against hand counts, the cache, the refusals, bad
files, and training and snn-eval end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from snn_train import load_config
from snn_train.config import compose
from snn_train.data import load_split
from snn_train.encoders import build_encoder
from snn_train.errors import ConfigError, DataError

pytest.importorskip("tonic", reason="data=nmnist needs the events extra (tonic)")

Event = tuple[int, int, int, int]  # x, y, polarity, t in µs


def encode(events: list[Event]) -> bytes:
    """N-MNIST's 40-bit events: x (bits 39-32), y (31-24), polarity (23), timestamp in µs (22-0), big-endian."""
    return b"".join(bytes([x, y, (p << 7) | (t >> 16), (t >> 8) & 0xFF, t & 0xFF]) for x, y, p, t in events)


def write_recording(root: Path, split: str, label: int, name: str, events: list[Event]) -> Path:
    """One recording in tonic's layout: <root>/NMNIST/<Train|Test>/<label>/<name>.bin."""
    file = root / "NMNIST" / split / str(label) / f"{name}.bin"
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_bytes(encode(events))
    return file


def make_nmnist(root: Path, n_train: int = 40, n_test: int = 20) -> Path:
    """A small N-MNIST-layout data set: class k's events fall on rows 3k … 3k+2, spread over 300 ms; returns root."""
    generator = torch.Generator().manual_seed(0)
    for split, n in (("Train", n_train), ("Test", n_test)):
        for index in range(n):
            label = index % 10
            times = torch.randint(0, 300_000, (200,), generator=generator).sort().values.tolist()
            columns = torch.randint(0, 34, (200,), generator=generator).tolist()
            rows = (3 * label + torch.randint(0, 3, (200,), generator=generator)).tolist()
            polarities = torch.randint(0, 2, (200,), generator=generator).tolist()
            write_recording(root, split, label, f"{index:05d}", list(zip(columns, rows, polarities, times)))
    return root


def nmnist_config(root: Path, *overrides: str):
    return load_config(["data=nmnist", f"data.root={root}", "data.download=false", *overrides])


def test_written_events_read_back_through_tonic(tmp_path: Path) -> None:
    from snn_train.nmnist import read_events

    events = [(0, 0, 0, 0), (33, 1, 1, 5), (7, 33, 1, 65_536), (20, 19, 0, 2**23 - 1)]
    read = read_events(write_recording(tmp_path, "Test", 3, "00001", events))
    assert [(int(e["x"]), int(e["y"]), int(e["p"]), int(e["t"])) for e in read] == events


# One recording spanning t = 0 … 300 µs: with T=3 bins of 300 // 3 = 100 µs, and the last event (t = 300, the
# recording's end) outside every bin, as tonic bins.
HAND_EVENTS = [
    (1, 2, 1, 0),
    (1, 2, 1, 10),  # the same pixel again: a count of 2 in bin 0
    (5, 6, 0, 50),
    (33, 33, 1, 99),
    (5, 6, 0, 100),  # bin 1 starts at 100
    (0, 0, 1, 150),
    (9, 8, 0, 299),  # bin 2
    (9, 8, 1, 300),  # the recording's end: outside the bins
]


def frames_of(counts: dict[tuple[int, int, int, int], int], steps: int) -> torch.Tensor:
    """Frames [T, 2, 34, 34] from hand counts {(step, polarity, y, x): count}."""
    frames = torch.zeros(steps, 2, 34, 34, dtype=torch.uint8)
    for (step, polarity, y, x), count in counts.items():
        frames[step, polarity, y, x] = count
    return frames


def test_frames_by_time_bins_match_a_hand_count(tmp_path: Path) -> None:
    write_recording(tmp_path, "Test", 4, "00001", HAND_EVENTS)
    split = load_split(nmnist_config(tmp_path, "seq_length=3").data, train=False, seq_length=3)
    expected = {(0, 1, 2, 1): 2, (0, 0, 6, 5): 1, (0, 1, 33, 33): 1, (1, 0, 6, 5): 1, (1, 1, 0, 0): 1, (2, 0, 8, 9): 1}
    assert split.images.shape == (1, 3, 2, 34, 34) and split.images.dtype == torch.uint8
    assert torch.equal(split.images[0], frames_of(expected, 3))
    assert split.labels.tolist() == [4] and split.input_shape == (2, 34, 34)


def test_frames_by_time_window_match_a_hand_count(tmp_path: Path) -> None:
    events = [(1, 2, 1, 30), (1, 2, 1, 59), (5, 6, 0, 60), (33, 33, 1, 119), (0, 0, 1, 120), (9, 8, 0, 500)]
    write_recording(tmp_path, "Test", 2, "00001", events)
    cfg = nmnist_config(tmp_path, "seq_length=2", "data.time_window_ms=0.06")  # 60 µs frames from t = 0 (not from 30)
    split = load_split(cfg.data, train=False, seq_length=2)
    expected = {(0, 1, 2, 1): 2, (1, 0, 6, 5): 1, (1, 1, 33, 33): 1}  # t >= 120 left out
    assert torch.equal(split.images[0], frames_of(expected, 2))


def test_first_saccade_only_keeps_the_events_before_100_ms(tmp_path: Path) -> None:
    events = [(3, 4, 1, 0), (3, 4, 1, 99_999), (3, 4, 1, 100_000), (3, 4, 1, 250_000)]
    write_recording(tmp_path, "Test", 0, "00001", events)
    cfg = nmnist_config(tmp_path, "seq_length=1", "data.time_window_ms=300", "data.first_saccade_only=true")
    assert load_split(cfg.data, train=False, seq_length=1).images[0, 0, 1, 4, 3] == 2
    cfg = nmnist_config(tmp_path, "seq_length=1", "data.time_window_ms=300")
    assert load_split(cfg.data, train=False, seq_length=1).images[0, 0, 1, 4, 3] == 4


def test_a_recording_without_events_in_range_gives_silent_frames(tmp_path: Path) -> None:
    write_recording(tmp_path, "Test", 0, "00001", [(3, 4, 1, 200_000)])
    cfg = nmnist_config(tmp_path, "seq_length=2", "data.first_saccade_only=true")
    assert torch.equal(load_split(cfg.data, train=False, seq_length=2).images, torch.zeros(1, 2, 2, 34, 34).byte())


@pytest.mark.parametrize("clip, expected", [(True, [1.0, 1.0, 0.0]), (False, [3.0, 1.0, 0.0])])
def test_the_events_encoder_gives_frame_t_at_step_t(tmp_path: Path, clip: bool, expected: list[float]) -> None:
    cfg = nmnist_config(tmp_path, "seq_length=3", f"encoder.clip={clip}", "encoder.input_scale=2")
    frames = torch.zeros(2, 3, 2, 34, 34)
    frames[1, :, 1, 5, 7] = torch.tensor([3.0, 1.0, 0.0])
    encoded = build_encoder(cfg.encoder, 3)(frames)
    assert encoded.shape == (3, 2, 2, 34, 34)
    assert encoded[:, 1, 1, 5, 7].tolist() == [2 * value for value in expected]
    assert encoded.sum() == 2 * sum(expected)


def test_the_cache_is_read_instead_of_the_files(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    make_nmnist(tmp_path)
    cfg = nmnist_config(tmp_path, "seq_length=4")
    first = load_split(cfg.data, train=True, seq_length=4)
    cache = tmp_path / "NMNIST" / "frames" / "train-T4-bins.pt"
    assert cache.is_file()
    # Change a recording's events but not its size or time: a second load that still gives the old frames read them
    # from the cache, not from the files.
    file = tmp_path / "NMNIST" / "Train" / "0" / "00000.bin"
    status = file.stat()
    file.write_bytes(encode([(0, 0, 0, t) for t in range(200)]))
    os.utime(file, ns=(status.st_atime_ns, status.st_mtime_ns))
    with caplog.at_level("INFO"):
        second = load_split(cfg.data, train=True, seq_length=4)
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)
    assert "binning" not in caplog.text
    load_split(cfg.data, train=True, seq_length=5)  # another T: another cache file beside it
    assert sorted(path.name for path in cache.parent.iterdir()) == ["train-T4-bins.pt", "train-T5-bins.pt"]


def flip_a_frame_byte(file: Path) -> None:
    cache = torch.load(file, weights_only=True)
    cache["frames"].view(-1)[1234] ^= 1
    torch.save(cache, file)


def truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[:3000])


def garbage(file: Path) -> None:
    file.write_bytes(b"not a tensor file")


@pytest.mark.parametrize("damage", [flip_a_frame_byte, truncate, garbage])
def test_a_damaged_cache_is_rebuilt(tmp_path: Path, caplog: pytest.LogCaptureFixture, damage) -> None:
    make_nmnist(tmp_path)
    cfg = nmnist_config(tmp_path, "seq_length=4")
    first = load_split(cfg.data, train=False, seq_length=4)
    cache = tmp_path / "NMNIST" / "frames" / "test-T4-bins.pt"
    damage(cache)
    with caplog.at_level("WARNING"):
        again = load_split(cfg.data, train=False, seq_length=4)
    assert torch.equal(again.images, first.images)
    assert f"{cache} is damaged" in caplog.text
    assert torch.equal(torch.load(cache, weights_only=True)["frames"], first.images)  # written anew


def test_a_stale_cache_is_rebuilt(tmp_path: Path) -> None:
    make_nmnist(tmp_path, n_test=10)
    cfg = nmnist_config(tmp_path, "seq_length=1", "data.time_window_ms=300")
    before = load_split(cfg.data, train=False, seq_length=1)
    write_recording(tmp_path, "Test", 3, "00003", [(30, 31, 1, 5)] * 7)
    after = load_split(cfg.data, train=False, seq_length=1)
    assert after.images[3].sum() == 7 and after.images[3, 0, 1, 31, 30] == 7
    assert torch.equal(after.images[:3], before.images[:3]) and torch.equal(after.images[4:], before.images[4:])


def test_a_data_root_that_cannot_hold_the_cache_still_trains(tmp_path: Path, caplog) -> None:
    make_nmnist(tmp_path, n_test=10)
    (tmp_path / "NMNIST" / "frames").write_text("a file where the cache folder would be")
    with caplog.at_level("WARNING"):
        split = load_split(nmnist_config(tmp_path, "seq_length=2").data, train=False, seq_length=2)
    assert len(split) == 10 and "cannot cache the frames" in caplog.text


def truncated_file(file: Path) -> str:
    file.write_bytes(file.read_bytes()[:-2])
    return "is not a whole number of 5-byte events"


def empty_file(file: Path) -> str:
    file.write_bytes(b"")
    return "empty (0 bytes)"


def off_the_sensor(file: Path) -> str:
    file.write_bytes(encode([(3, 3, 0, 10), (40, 3, 0, 20)]))
    return "event 1 lies at x=40, y=3, outside the 34×34 sensor"


def time_going_back(file: Path) -> str:
    file.write_bytes(encode([(3, 3, 0, 10), (3, 4, 0, 20), (3, 5, 0, 15)]))
    return "the timestamps go back in time at event 2"


def outside_a_class_folder(file: Path) -> str:
    file.rename(file.parent.parent / file.name)
    return "not in a class folder"


BAD_RECORDINGS = [truncated_file, empty_file, off_the_sensor, time_going_back, outside_a_class_folder]


@pytest.mark.parametrize("damage", BAD_RECORDINGS)
def test_a_bad_recording_is_named(tmp_path: Path, damage) -> None:
    make_nmnist(tmp_path, n_test=10)
    file = tmp_path / "NMNIST" / "Test" / "7" / "00007.bin"
    message = damage(file)
    with pytest.raises(DataError) as raised:
        load_split(nmnist_config(tmp_path, "seq_length=2").data, train=False, seq_length=2)
    named = file if damage is not outside_a_class_folder else file.parent.parent / file.name
    assert str(raised.value).startswith(f"{named}: ") and message in str(raised.value)


def test_missing_data_without_download_says_where_to_put_it(tmp_path: Path) -> None:
    with pytest.raises(DataError) as raised:
        load_split(nmnist_config(tmp_path, "seq_length=2").data, train=True, seq_length=2)
    assert str(raised.value).startswith(f"nmnist not found: {tmp_path / 'NMNIST' / 'Train'} holds no .bin files")
    assert "data.download=false" in str(raised.value)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data=nmnist", "encoder=direct"], "data=nmnist holds event frames, which encoder=direct cannot take (it"),
        (["data=nmnist", "encoder=poisson"], "data=nmnist holds event frames, which encoder=poisson cannot take"),
        (["encoder=events"], "encoder=events takes event frames, but data=mnist holds images"),
        (["data=nmnist", "augment.shift=2"], "augment.* transforms images; data=nmnist holds event"),
        (["data=nmnist", "data.time_window_ms=0"], "data.time_window_ms must be at least 0.001"),
        (["data=nmnist", "data.time_window_ms=-5"], "data.time_window_ms must be at least 0.001"),
    ],
)
def test_mismatched_encoders_and_impossible_binnings_are_refused(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("*", r"\*")):
        load_config(overrides)


SMALL = [
    "data.val_size=0",
    "seq_length=4",
    "train.batch_size=8",
    "train.eval_batch_size=10",
    "train.device=cpu",
    "train.compile=false",
]


def snn(command: str, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([command, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_two_training_steps_and_snn_eval_on_n_mnist(tmp_path: Path) -> None:
    root = make_nmnist(tmp_path / "data")
    run = tmp_path / "run"
    args = [
        "data=nmnist",  # its encoder is events: the command the README gives, nothing more
        "data.root=data",
        "data.download=false",
        "train.limit_batches=2",
        "log.every_n_steps=1",
        *SMALL,
    ]
    first = snn("snn-train", tmp_path, *args, f"hydra.run.dir={run}")
    assert first.returncode == 0, first.stderr
    assert "binning 40 recordings" in (run / "cli.log").read_text()
    assert {path.name for path in (root / "NMNIST" / "frames").iterdir()} == {"train-T4-bins.pt", "test-T4-bins.pt"}
    metrics = json.loads((run / "metrics.json").read_text())["final"]
    assert metrics["step"] == 2 and 0 <= metrics["test_accuracy"] <= 1
    events = EventAccumulator(str(run), size_guidance={"images": 0})
    events.Reload()
    assert "Input/spike_raster" in events.Tags()["images"]
    assert events.Scalars("SpikeRate/encoder")[0].value > 0

    second = snn("snn-train", tmp_path, *args, f"hydra.run.dir={tmp_path / 'again'}")
    assert second.returncode == 0, second.stderr
    assert "binning" not in (tmp_path / "again" / "cli.log").read_text()

    evaluated = snn("snn-eval", tmp_path, f"checkpoint={run}", "device=cpu")
    assert evaluated.returncode == 0, evaluated.stderr
    report = json.loads((run / "checkpoints" / "eval.json").read_text())
    assert report["data"]["name"] == "nmnist" and report["samples"] == 20
    assert report["accuracy"] == pytest.approx(metrics["test_accuracy"])
    assert report["layers"]["conv1"]["neurons"] == 32 * 30 * 30  # 2×34×34 input, 5×5 kernels


@pytest.mark.slow
def test_a_bad_recording_stops_snn_train_with_one_line(tmp_path: Path) -> None:
    root = make_nmnist(tmp_path)
    bad = root / "NMNIST" / "Train" / "5" / "00015.bin"
    truncated_file(bad)
    result = snn("snn-train", tmp_path, "data=nmnist", f"data.root={root}", "data.download=false")
    assert result.returncode == 2
    assert result.stderr.startswith(f"snn-train: error: {bad}: ") and result.stderr.count("\n") == 1


def test_snn_eval_refuses_image_data_for_an_n_mnist_network(tmp_path: Path, capsys) -> None:
    from snn_train.cli import run_eval
    from snn_train.train import fit

    root = make_nmnist(tmp_path / "data", n_train=8, n_test=4)
    fit(nmnist_config(root, *SMALL, "train.limit_batches=1", "log.progress_bar=false"), tmp_path / "run")
    cfg = compose("eval", [f"checkpoint={tmp_path / 'run'}", "device=cpu", "data=mnist", f"data.root={root}"])
    with pytest.raises(SystemExit) as raised:
        run_eval(cfg)
    error = capsys.readouterr().err
    assert raised.value.code == 2
    assert error == "snn-eval: error: encoder=events takes event frames, but data=mnist holds images; " + (
        "use an event data set (nmnist) or an image encoder (direct, poisson, latency, constant_current)\n"
    )


@pytest.mark.slow
def test_under_torchrun_rank_0_bins_and_both_ranks_train_on_the_frames(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = make_nmnist(tmp_path / "data")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "snn_train"]
    args = ["data=nmnist", f"data.root={root}", "data.download=false", "train.limit_batches=2"]
    result = subprocess.run(
        [*torchrun, *args, *SMALL, f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["final"]["step"] == 2
    with caplog.at_level("INFO"):  # the cache the ranks left is complete and intact: read back, not binned again
        assert len(load_split(nmnist_config(root, "seq_length=4").data, train=True, seq_length=4)) == 40
    assert "binning" not in caplog.text and "damaged" not in caplog.text
