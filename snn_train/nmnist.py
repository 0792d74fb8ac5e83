"""N-MNIST: the dataset's own event files, read and binned into frames with tonic, the frames cached under data.root.

N-MNIST (Orchard et al. 2015) is MNIST recorded by an event camera (34×34 pixels, two polarities) moved in three
saccades of about 100 ms each. Its recordings lie in ``<data.root>/NMNIST/{Train,Test}/<digit>/<id>.bin``, the
layout tonic.datasets.NMNIST unpacks its archives into: 5 bytes per event, x (8 bits), y (8 bits), polarity (1 bit)
and a timestamp in µs (23 bits). That class downloads whenever a split's archive is missing or its folder holds fewer
than 10 000 files, so the folders are read here with tonic's own reader and transforms, and the class is called only
to download.

Each recording becomes ``seq_length`` frames [T, 2, 34, 34] of event counts (tonic's ToFrame): its span cut into T
equal bins, or with ``data.time_window_ms`` frames of that length from t = 0. A split is binned once; its frames are
kept in ``<data.root>/NMNIST/frames/`` as one tensor file per split, T and binning, checked when read back.
"""

from __future__ import annotations

import hashlib
import logging
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import tonic
import torch
from tonic.datasets import NMNIST
from tonic.io import read_mnist_file
from tonic.transforms import Compose, CropTime, ToFrame
from tqdm import tqdm

from snn_train import distributed
from snn_train.checkpoint import write_atomically
from snn_train.data import NUM_CLASSES, Split
from snn_train.errors import CheckpointError, DataError
from snn_train.schema import EventDataConfig

log = logging.getLogger(__name__)

WIDTH, HEIGHT, POLARITIES = NMNIST.sensor_size  # (34, 34, 2)
EVENT_BYTES = 5
FIRST_SACCADE_END_US = 100_000  # tonic's NMNIST(first_saccade_only=True) keeps the events with t < 1e5 µs
CLASS_FOLDERS = [str(digit) for digit in range(NUM_CLASSES)]
CACHE_FORMAT = 1  # raised whenever what a cache file holds changes, so older files count as stale


def split_folder(data_cfg: EventDataConfig, train: bool) -> Path:
    """``<data.root>/NMNIST/Train`` or ``…/Test``, where tonic unpacks the split."""
    return Path(data_cfg.root) / NMNIST.__name__ / (NMNIST.train_folder if train else NMNIST.test_folder)


def recordings(folder: Path) -> tuple[list[Path], list[int]]:
    """The split's .bin files in tonic's order (sorted paths) and their labels, the digit naming each file's folder."""
    files = sorted(folder.rglob("*.bin"))
    for file in files:
        if file.parent.parent != folder or file.parent.name not in CLASS_FOLDERS:
            raise DataError(f"{file}: not in a class folder {folder}/0 … {folder}/9, so it has no label")
    return files, [int(file.parent.name) for file in files]


def read_events(file: Path) -> np.ndarray:
    """One recording's events (tonic's structured array: x, y, t, p), or DataError naming the file."""
    try:
        size = file.stat().st_size
        if size == 0:
            raise DataError(f"{file}: empty (0 bytes); the file is truncated or not an N-MNIST recording")
        if size % EVENT_BYTES:
            raise DataError(
                f"{file}: {size} bytes is not a whole number of {EVENT_BYTES}-byte events; "
                "the file is truncated or not an N-MNIST recording"
            )
        events = read_mnist_file(os.fspath(file), dtype=NMNIST.dtype)
    except OSError as error:
        raise DataError(f"{file}: cannot read it ({error.strerror or error})") from None
    outside = (events["x"] >= WIDTH) | (events["y"] >= HEIGHT)
    if outside.any():
        n = int(outside.argmax())
        x, y = events["x"][n], events["y"][n]
        raise DataError(f"{file}: event {n} lies at x={x}, y={y}, outside the 34×34 sensor; not an N-MNIST recording")
    backwards = np.diff(events["t"]) < 0
    if backwards.any():
        raise DataError(f"{file}: the timestamps go back in time at event {int(backwards.argmax()) + 1}; it is corrupt")
    return events


def frame_transform(data_cfg: EventDataConfig, seq_length: int) -> Compose:
    """tonic's transforms from events to T frames: the first saccade only if asked, then ToFrame.

    By number of bins (``time_window_ms`` null), bin k of a recording spanning t0 … t1 holds the events with
    t0 + k·w <= t < t0 + (k+1)·w, w = (t1 - t0) // T µs (tonic's rule; the last few µs fall outside). With a time
    window of w µs, frame k holds k·w <= t < (k+1)·w, and events after T·w are left out.
    """
    crop = [CropTime(max=FIRST_SACCADE_END_US - 1)] if data_cfg.first_saccade_only else []
    if data_cfg.time_window_ms is None:
        return Compose([*crop, ToFrame(NMNIST.sensor_size, n_time_bins=seq_length)])
    window_us = round(data_cfg.time_window_ms * 1000)
    return Compose(
        [*crop, ToFrame(NMNIST.sensor_size, time_window=window_us, start_time=0, end_time=seq_length * window_us)]
    )


def bin_recording(events: np.ndarray, transform: Compose, seq_length: int) -> torch.Tensor:
    """Frames uint8 [T, 2, 34, 34] of one recording's event counts (saturating at 255; no silence when none)."""
    events = transform(events)
    if events.dtype.names is not None:  # tonic's Compose hands back an empty event array unchanged
        return torch.zeros(seq_length, POLARITIES, HEIGHT, WIDTH, dtype=torch.uint8)
    return torch.from_numpy(np.minimum(events, 255).astype(np.uint8))


def bin_split(files: list[Path], transform: Compose, seq_length: int, name: str) -> torch.Tensor:
    """Every recording's frames, uint8 [N, T, 2, 34, 34], with a progress bar on a terminal."""
    frames = torch.empty(len(files), seq_length, POLARITIES, HEIGHT, WIDTH, dtype=torch.uint8)
    for n, file in enumerate(tqdm(files, desc=f"binning N-MNIST {name}", unit="recording", disable=None)):
        frames[n] = bin_recording(read_events(file), transform, seq_length)
    return frames


def cache_path(data_cfg: EventDataConfig, train: bool, seq_length: int) -> Path:
    """The split's cache file, named after what its frames depend on, so several bindings can sit side by side."""
    binning = "bins" if data_cfg.time_window_ms is None else f"window{data_cfg.time_window_ms:g}ms"
    saccades = "-first_saccade" if data_cfg.first_saccade_only else ""
    split = "train" if train else "test"
    return Path(data_cfg.root) / NMNIST.__name__ / "frames" / f"{split}-T{seq_length}-{binning}{saccades}.pt"


def cache_key(data_cfg: EventDataConfig, seq_length: int, folder: Path, files: list[Path]) -> dict[str, Any]:
    """What the cached frames depend on: the binning, tonic's version, and each file's name, size and time."""
    listing = hashlib.sha256()
    for file in files:
        status = file.stat()
        listing.update(f"{file.relative_to(folder)}\t{status.st_size}\t{status.st_mtime_ns}\n".encode())
    return {
        "format": CACHE_FORMAT,
        "tonic": tonic.__version__,
        "seq_length": seq_length,
        "time_window_ms": data_cfg.time_window_ms,
        "first_saccade_only": data_cfg.first_saccade_only,
        "files": listing.hexdigest(),
    }


def checksum(frames: torch.Tensor, labels: torch.Tensor) -> int:
    """CRC-32 of the frames' and labels' bytes: a cache file whose tensors changed on disk is not trusted."""
    return zlib.crc32(labels.numpy().tobytes(), zlib.crc32(memoryview(frames.numpy()).cast("B")))


def read_cache(path: Path, key: dict[str, Any], count: int) -> Split | None:
    """The cached split if ``path`` holds one for ``key`` that is intact; None (binning again) otherwise."""
    if not path.is_file():
        return None
    try:
        cache = torch.load(path, map_location="cpu", weights_only=True)
        frames, labels = cache["frames"], cache["labels"]
        intact = frames.shape[0] == labels.shape[0] == count and checksum(frames, labels) == cache["checksum"]
    except Exception as error:  # any failure to read it back (truncated, not a zip, wrong contents) means damaged
        log.warning("%s is damaged (%s); binning again", path, " ".join(str(error).split()) or type(error).__name__)
        return None
    if cache.get("key") != key:
        log.info("%s is stale (the files or the binning changed); binning again", path)
        return None
    if not intact:
        log.warning("%s is damaged (its frames fail their checksum); binning again", path)
        return None
    return Split(frames, labels)


def write_cache(path: Path, key: dict[str, Any], split: Split) -> None:
    """Write the frames atomically; a data.root that cannot be written to only costs binning again next time."""
    frames, labels = split.images, split.labels
    state = {"key": key, "frames": frames, "labels": labels, "checksum": checksum(frames, labels)}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, lambda f: torch.save(state, f))
    except (OSError, CheckpointError) as error:
        log.warning("cannot cache the frames (%s); the next run bins them again", error)


def download(data_cfg: EventDataConfig, train: bool) -> None:
    """Download and unpack the split with tonic's NMNIST class, the only thing it is used for."""
    try:
        NMNIST(os.fspath(data_cfg.root), train=train)
    except Exception as error:  # urllib, zipfile, tonic's checksum: whatever it raises means the download failed
        raise DataError(
            f"nmnist: the download into {Path(data_cfg.root) / NMNIST.__name__} failed "
            f"({' '.join(str(error).split()) or type(error).__name__}); put the unpacked Train and Test folders there"
        ) from None


def load_split(data_cfg: EventDataConfig, train: bool, seq_length: int) -> Split:
    """The train or test split as frames uint8 [N, T, 2, 34, 34] and labels, from the cache or binned and cached.

    In a distributed run rank 0 downloads, bins and caches first; the other ranks then find its files.
    """
    if not distributed.is_main():
        distributed.barrier()
    folder = split_folder(data_cfg, train)
    files, labels = recordings(folder)
    if not files:
        if not data_cfg.download:
            raise DataError(
                f"nmnist not found: {folder} holds no .bin files and data.download=false; unpack N-MNIST's "
                f"{NMNIST.train_filename} and {NMNIST.test_filename} into {folder.parent} or point data.root at the "
                "folder that holds NMNIST/"
            )
        download(data_cfg, train)
        files, labels = recordings(folder)
        if not files:
            raise DataError(f"nmnist: the download left no .bin files in {folder}; unpack the archives there by hand")
    key, path = cache_key(data_cfg, seq_length, folder, files), cache_path(data_cfg, train, seq_length)
    split = read_cache(path, key, len(files))
    if split is None:
        log.info("binning %d recordings in %s into %d frames each (cached in %s)", len(files), folder, seq_length, path)
        frames = bin_split(files, frame_transform(data_cfg, seq_length), seq_length, folder.name)
        split = Split(frames, torch.tensor(labels))
        if distributed.is_main():
            write_cache(path, key, split)
    if distributed.is_main():
        distributed.barrier()
    return split
