"""Training-step speed and memory of snn-train against its reference loop, the ANN limit and Norse.

Every figure is the median of ``--steps`` timed steps after warm-up, on the same network, T, B and
thread count. Each variant runs in a fresh process so its peak memory is its own. snn-train and the
ANN limit run with snn-train's allocator setting (snn_train.allocator); Norse runs as shipped, and
once more with that setting (``norse_tuned_allocator``) so the comparison can be read both ways.

Usage: python scripts/benchmark.py [--seq-length 16] [--batch-size 32] [--threads 2] [--device cpu] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from unittest import mock

import torch
from torch import nn
from torch.nn import functional as F

from snn_train.allocator import keep_freed_memory

VARIANTS = (
    "snn_train_fp32",
    "snn_train_bf16",
    "reference_loop",
    "ann_limit_fp32",
    "ann_limit_bf16",
    "norse",
    "norse_tuned_allocator",
)


def snn_train_step(args: argparse.Namespace) -> tuple[nn.Module, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """The training application's network and loss (encoder, model, max decoder, cross-entropy)."""
    from snn_train import ConvSNN, load_config
    from snn_train.encoders import build_encoder
    from snn_train.task import decode

    cfg = load_config([f"seq_length={args.seq_length}", f"train.device={args.device}"])
    model = ConvSNN.from_config(cfg.model, (1, 28, 28), cfg.train.compile)
    encoder = build_encoder(cfg.encoder, cfg.seq_length)

    def loss(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(decode(model(encoder(images)), cfg.decoder), labels)

    return model, loss


class AnnLimit(nn.Module):
    """The same conv/fc layers with ReLU instead of LIF, on the T·B-flattened batch: the hardware limit."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 32, 5), nn.Conv2d(32, 64, 5)
        self.fc1, self.readout = nn.Linear(1024, 1024), nn.Linear(1024, 10, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, B = x.shape[:2]
        h = F.max_pool2d(F.relu(self.conv1(x.flatten(0, 1))), 2)
        h = F.max_pool2d(F.relu(10 * self.conv2(h)), 2)
        return self.readout(F.relu(self.fc1(h.flatten(1)))).unflatten(0, (T, B))


def ann_step(args: argparse.Namespace) -> tuple[nn.Module, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    model = AnnLimit()

    def loss(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = images.expand(args.seq_length, *images.shape)
        return F.cross_entropy(model(x).max(0).values, labels)

    return model, loss


def norse_step(args: argparse.Namespace) -> tuple[nn.Module, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """Norse 1.1.0's seed network, stepped in time with its cells, as in Norse's MNIST example."""
    import norse.torch as norse

    class NorseSeed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            p = norse.LIFParameters(method="super", alpha=torch.as_tensor(100.0))
            self.conv1, self.conv2 = nn.Conv2d(1, 32, 5), nn.Conv2d(32, 64, 5)
            self.fc1, self.out = nn.Linear(1024, 1024), nn.Linear(1024, 10, bias=False)
            self.lif0, self.lif1, self.lif2 = norse.LIFCell(p), norse.LIFCell(p), norse.LIFCell(p)
            self.li = norse.LICell()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            s0 = s1 = s2 = so = None
            voltages = []
            for t in range(x.shape[0]):
                z, s0 = self.lif0(self.conv1(x[t]), s0)
                z = F.max_pool2d(z, 2)
                z, s1 = self.lif1(10 * self.conv2(z), s1)
                z = F.max_pool2d(z, 2)
                z, s2 = self.lif2(self.fc1(z.flatten(1)), s2)
                v, so = self.li(self.out(F.relu(z)), so)
                voltages.append(v)
            return torch.stack(voltages)

    model = NorseSeed()

    def loss(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = images.expand(args.seq_length, *images.shape)
        return F.nll_loss(F.log_softmax(model(x).max(0).values, dim=1), labels)

    return model, loss


def build(
    variant: str, args: argparse.Namespace
) -> tuple[nn.Module, Callable[[torch.Tensor, torch.Tensor], torch.Tensor], bool]:
    """(model, loss function, bf16 autocast?) for a variant."""
    if variant != "norse":
        keep_freed_memory()
    if variant.startswith("snn_train"):
        return (*snn_train_step(args), variant.endswith("bf16"))
    if variant == "reference_loop":
        from snn_train import neurons

        def reference(currents, p, record_voltage, compiled):  # lif_sequence's signature, the step loop's work
            return neurons.lif_sequence_reference(currents, p, record_voltage)

        mock.patch("snn_train.model.lif_sequence", reference).start()
        mock.patch("snn_train.model.li_sequence", neurons.li_sequence_reference).start()
        return (*snn_train_step(args), False)
    if variant.startswith("ann_limit"):
        return (*ann_step(args), variant.endswith("bf16"))
    return (*norse_step(args), False)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_variant(variant: str, args: argparse.Namespace) -> dict[str, float]:
    """Median training-step time (forward, backward, Adam) and peak memory, in this process."""
    torch.manual_seed(0)
    device = torch.device(args.device)
    model, loss_fn, bf16 = build(variant, args)
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    images = torch.rand(args.batch_size, 1, 28, 28, device=device)
    labels = torch.randint(0, 10, (args.batch_size,), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step() -> float:
        sync()
        start = time.perf_counter()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
        with autocast:
            loss = loss_fn(images, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sync()
        return time.perf_counter() - start

    faults: list[int] = []
    warmup = [step() for _ in range(args.warmup)]
    times = [step() for _ in range(args.steps)]
    result = {"train_step_ms": 1000 * statistics.median(times), "first_step_s": warmup[0]}
    result["samples_per_s"] = args.batch_size / (result["train_step_ms"] / 1000)
    result["page_faults_per_step"] = (
        resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults[args.warmup]
    ) / args.steps
    if variant == "snn_train_fp32":
        result["data_and_encoding_ms"] = data_and_encoding_ms(args, device)
        model.eval()
        with torch.no_grad():
            loss_fn(images, labels)
            sync()
            start = time.perf_counter()
            for _ in range(args.steps):
                loss_fn(images, labels)
            sync()
        result["inference_samples_per_s"] = args.steps * args.batch_size / (time.perf_counter() - start)
    result["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else peak_rss_mb()
    return result


def data_and_encoding_ms(args: argparse.Namespace, device: torch.device) -> float:
    """Median time to draw a shuffled batch from an in-memory uint8 MNIST-sized set and encode it, as fit does."""
    from snn_train import load_config
    from snn_train.data import batch_indices, to_unit_interval
    from snn_train.encoders import build_encoder

    cfg = load_config([f"seq_length={args.seq_length}"])
    encoder = build_encoder(cfg.encoder, cfg.seq_length).to(device)
    images = torch.randint(0, 256, (60000, 28, 28), dtype=torch.uint8, device=device)
    batches = batch_indices(len(images), args.batch_size, torch.Generator().manual_seed(0), None)
    times = []
    for index in list(batches)[: args.warmup + args.steps]:
        start = time.perf_counter()
        encoder(to_unit_interval(images[index]))
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[args.warmup :])


def run_in_subprocess(variant: str, args: argparse.Namespace, seq_length: int) -> dict[str, float] | None:
    command = [
        sys.executable,
        __file__,
        "--variant",
        variant,
        "--seq-length",
        str(seq_length),
        "--batch-size",
        str(args.batch_size),
        "--threads",
        str(args.threads),
        "--device",
        args.device,
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        if variant.startswith("norse") and "No module named 'norse'" in done.stderr:
            return None
        raise RuntimeError(f"{variant} failed:\n{done.stderr}")
    return json.loads(done.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-length", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", help="write all figures to this file")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.variant:
        print(json.dumps(time_variant(args.variant, args)))
        return

    results = {variant: run_in_subprocess(variant, args, args.seq_length) for variant in VARIANTS}
    growth = {str(T): run_in_subprocess("snn_train_fp32", args, T) for T in (8, 16, 32, 64)}
    report = {
        "config": {
            "seq_length": args.seq_length,
            "batch_size": args.batch_size,
            "threads": args.threads,
            "device": args.device,
        },
        "train_step_ms": {k: v and round(v["train_step_ms"], 1) for k, v in results.items()},
        "samples_per_s": {k: v and round(v["samples_per_s"], 1) for k, v in results.items()},
        "peak_memory_mb": {k: v and round(v["peak_memory_mb"], 1) for k, v in results.items()},
        "page_faults_per_step": {k: v and round(v["page_faults_per_step"]) for k, v in results.items()},
        "inference_samples_per_s": round(results["snn_train_fp32"]["inference_samples_per_s"], 1),
        "data_and_encoding_ms": round(results["snn_train_fp32"]["data_and_encoding_ms"], 2),
        "first_step_s": {k: v and round(v["first_step_s"], 1) for k, v in results.items()},
        "memory_by_seq_length": {
            T: {"train_step_ms": round(r["train_step_ms"], 1), "peak_memory_mb": round(r["peak_memory_mb"], 1)}
            for T, r in growth.items()
        },
    }
    limit, norse = results["ann_limit_fp32"]["train_step_ms"], results["norse"] and results["norse"]["train_step_ms"]
    print(f"T={args.seq_length} B={args.batch_size} threads={args.threads} device={args.device}")
    print(
        f"{'variant':<22}{'ms/step':>9}{'samples/s':>11}{'peak MB':>9}{'faults/step':>13}"
        f"{'× ANN fp32':>12}{'× Norse speed':>15}"
    )
    for variant, r in results.items():
        if r is None:
            print(f"{variant:<22}{'(Norse not installed)':>30}")
            continue
        speedup = f"{norse / r['train_step_ms']:.2f}" if norse else "-"
        print(
            f"{variant:<22}{r['train_step_ms']:>9.1f}{r['samples_per_s']:>11.1f}{r['peak_memory_mb']:>9.0f}"
            f"{r['page_faults_per_step']:>13.0f}{r['train_step_ms'] / limit:>12.2f}{speedup:>15}"
        )
    data_ms = report["data_and_encoding_ms"]
    print(
        f"data + encoding: {data_ms:.2f} ms per batch = "
        f"{100 * data_ms / results['snn_train_fp32']['train_step_ms']:.1f} % of the fp32 step"
    )
    print(
        f"first snn_train_fp32 step (includes compiling the LIF backward, or loading it from the cache): "
        f"{report['first_step_s']['snn_train_fp32']:.1f} s"
    )
    print(f"inference (no_grad, eval): {report['inference_samples_per_s']:.0f} samples/s")
    for T, r in report["memory_by_seq_length"].items():
        print(f"T={T:>3}: {r['train_step_ms']:8.1f} ms/step, peak {r['peak_memory_mb']:7.0f} MB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
