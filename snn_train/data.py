"""Datasets into memory once (uint8 on the training device), checked, and batched by index."""

from __future__ import annotations

import functools
import importlib.util
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from snn_train.errors import ConfigError, DataError
from snn_train.schema import DataConfig, EventDataConfig

NUM_CLASSES = 10
IDX_UBYTE = 0x08


@dataclass
class Split:
    """One split in memory, uint8: images [N, H, W] or, for event data, frames of event counts [N, T, C, H, W]; labels
    int64 [N]."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device) -> Split:
        return Split(self.images.to(device), self.labels.to(device))

    @property
    def events(self) -> bool:
        """Whether the split holds event frames rather than images."""
        return self.images.dim() == 5

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one sample's input at one time step, which the network is built for."""
        return tuple(self.images.shape[2:]) if self.events else (1, *self.images.shape[1:])

    def encoder_input(self, index: torch.Tensor | slice) -> torch.Tensor:
        """The samples ``index`` as the encoders take them: images float [B, 1, H, W] in [0, 1], event frames float
        [B, T, C, H, W] counts."""
        samples = self.images[index]
        return samples.float() if self.events else to_unit_interval(samples)


def check_idx_file(path: Path, ndim: int) -> int:
    """Check an IDX file's header against its size; return its item count or raise DataError."""
    size = path.stat().st_size
    header = 4 + 4 * ndim
    with path.open("rb") as f:
        head = f.read(header)
    if len(head) < header:
        raise DataError(
            f"{path}: truncated IDX file ({size} bytes, shorter than its header); delete it and download again"
        )
    if head[0] != 0 or head[1] != 0 or head[2] != IDX_UBYTE or head[3] != ndim:
        raise DataError(
            f"{path}: not a {ndim}-dimensional uint8 IDX file "
            f"(magic number {head[:4].hex()}, expected 000008{ndim:02x}); "
            "replace it with the original file"
        )
    dims = [int.from_bytes(head[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim)]
    expected = header + math.prod(dims)
    if size != expected:
        raise DataError(
            f"{path}: IDX header says {dims} ({expected} bytes) but the file has {size} bytes; "
            "it is truncated or corrupt"
        )
    return dims[0]


def check_labels(path: Path) -> None:
    """Every label in an IDX label file (already checked by check_idx_file) must name a class."""
    labels = path.read_bytes()[8:]
    if labels and max(labels) >= NUM_CLASSES:
        first = next(n for n, label in enumerate(labels) if label >= NUM_CLASSES)
        raise DataError(f"{path}: labels must lie in 0..{NUM_CLASSES - 1}, found {labels[first]} at index {first}")


def _check_raw_files(raw_folder: Path, train: bool) -> None:
    prefix = "train" if train else "t10k"
    images, labels = raw_folder / f"{prefix}-images-idx3-ubyte", raw_folder / f"{prefix}-labels-idx1-ubyte"
    if images.exists() and labels.exists():
        n_images, n_labels = check_idx_file(images, 3), check_idx_file(labels, 1)
        if n_images != n_labels:
            raise DataError(
                f"{images} holds {n_images} images but {labels} holds {n_labels} labels; the pair does not match"
            )
        check_labels(labels)


def load_images(class_name: str, data_cfg: DataConfig, train: bool, seq_length: int) -> Split:
    """The train or test split of torchvision's data set ``class_name`` from ``data_cfg.root`` (downloading if
    allowed); T plays no part in images."""
    from torchvision import datasets  # takes seconds to import (torch._dynamo with it): not before a config is checked

    dataset_class = getattr(datasets, class_name)
    root = Path(data_cfg.root)
    raw_folder = root / class_name / "raw"
    _check_raw_files(raw_folder, train)
    try:
        dataset = dataset_class(os.fspath(root), train=train, download=data_cfg.download)
    except RuntimeError as error:
        how = "the download failed" if data_cfg.download else "data.download=false"
        raise DataError(
            f"{data_cfg.name} not found in {raw_folder} and {how} ({' '.join(str(error).split())}); "
            f"put the IDX files there or point data.root at the folder that holds {class_name}/raw"
        ) from None
    return Split(dataset.data.to(torch.uint8), dataset.targets.to(torch.int64))


def load_events(data_cfg: EventDataConfig, train: bool, seq_length: int) -> Split:
    """N-MNIST's split binned into ``seq_length`` frames per sample (snn_train.nmnist)."""
    from snn_train import nmnist  # imports tonic, an optional extra that takes seconds to import: only for event data

    return nmnist.load_split(data_cfg, train, seq_length)


@dataclass(frozen=True)
class Dataset:
    """A ``data.name`` choice: how its splits are loaded, what they hold, and what it needs installed."""

    load: Callable[[DataConfig, bool, int], Split]  # (data config, train split?, T) → the split in memory
    events: bool = False  # event frames [N, T, C, H, W] (encoder=events), not images [N, H, W]
    schema: type[DataConfig] = DataConfig  # its data.* keys; configs/data/<name>.yaml names it too
    module: str | None = None  # a module it needs from the optional extra ``extra`` (pyproject.toml)
    extra: str | None = None


DATASETS: dict[str, Dataset] = {  # data.name → how it is loaded; configs/data/<name>.yaml
    "mnist": Dataset(functools.partial(load_images, "MNIST")),
    "fashion_mnist": Dataset(functools.partial(load_images, "FashionMNIST")),
    "kmnist": Dataset(functools.partial(load_images, "KMNIST")),
    "nmnist": Dataset(load_events, events=True, schema=EventDataConfig, module="tonic", extra="events"),
}


def check_installed(name: str) -> None:
    """ConfigError if data set ``name`` needs an optional extra that is not installed."""
    dataset = DATASETS[name]
    if dataset.module is not None and importlib.util.find_spec(dataset.module) is None:
        raise ConfigError(
            f"data={name} needs {dataset.module}, which the optional extra {dataset.extra} installs: "
            f"pip install 'snn-train[{dataset.extra}]' (in a clone: pip install -e '.[{dataset.extra}]')"
        )


def load_split(data_cfg: DataConfig, train: bool, seq_length: int) -> Split:
    """The train or test split of ``data_cfg.name`` in memory, for T = ``seq_length`` time steps."""
    check_installed(data_cfg.name)
    return DATASETS[data_cfg.name].load(data_cfg, train, seq_length)


def stratified_counts(class_sizes: torch.Tensor, size: int) -> torch.Tensor:
    """How many of each class a sample of ``size`` takes: each class's share ``size``·n_c/N rounded down, the
    remainder going one each to the classes with the largest fractions (largest remainder), so the counts sum to
    ``size`` and each is its share rounded down or up."""
    total = int(class_sizes.sum())
    counts = class_sizes * size // total
    fractions = class_sizes * size - counts * total  # each share's fraction, times N
    order = sorted(range(len(class_sizes)), key=lambda k: (-int(fractions[k]), k))
    counts[order[: size - int(counts.sum())]] += 1
    return counts


def hold_out(split: Split, size: int, seed: int) -> tuple[Split, Split]:
    """``split`` without a held-out part of ``size`` samples, and that part: every class in the proportion it has in
    ``split`` (``stratified_counts``), its samples drawn at random from a generator seeded with ``seed`` alone. Both
    parts keep the order they had in ``split``."""
    generator = torch.Generator().manual_seed(seed)
    labels = split.labels.cpu()
    class_sizes = torch.bincount(labels, minlength=NUM_CLASSES)
    held = torch.zeros(len(labels), dtype=torch.bool)
    for label, count in enumerate(stratified_counts(class_sizes, size).tolist()):
        members = (labels == label).nonzero().squeeze(1)
        held[members[torch.randperm(len(members), generator=generator)[:count]]] = True
    held = held.to(split.labels.device)
    return Split(split.images[~held], split.labels[~held]), Split(split.images[held], split.labels[held])


def batch_indices(
    n: int, batch_size: int, generator: torch.Generator | None, limit: int | None
) -> Iterator[torch.Tensor]:
    """Index batches over n items: shuffled with ``generator`` (or in order if None), at most ``limit``."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    batches = order.split(batch_size)
    return iter(batches[:limit] if limit is not None else batches)


def to_unit_interval(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, H, W] into float [B, 1, H, W] with values in [0, 1]."""
    return images.unsqueeze(1).float() / 255.0
