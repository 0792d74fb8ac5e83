"""Training-step speed and memory of snn-train against its reference loop, the ANN limit, Norse and SpikingJelly.

Every figure is the median of ``--steps`` timed steps after warm-up, on the same network, T, B and
thread count, every variant updating with fused Adam as snn-train does. Each variant runs in a fresh process so its
peak memory is its own. snn-train and the ANN limits run with snn-train's allocator setting (snn_train.allocator);
Norse runs as shipped, and once more with that setting (``norse_tuned_allocator``) so the comparison can be read both
ways. The ANN limit (``ann_limit``) is the same network with ReLU for LIF doing the dense work snn-train does: conv1
once per image (the direct encoder's input is the same at every step), everything after it at batch T·B; the ratios
use it. ``ann_conv1_every_step`` convolves all T·B inputs, as an ANN given the repeated input would.
Norse and SpikingJelly (its multi-step LIF neuron on the same network) are left out where not installed;
on CUDA ``snn_train_torch_kernels`` times snn-train with model.kernel=torch.

``train_step_ms_by_surrogate`` times snn_train_fp32 once per surrogate (``model=<name>``: the surrogate and its α),
the choice a sweep such as ``snn-train -m model=super,tanh`` makes; the default's entry is snn_train_fp32's figure.

``evaluation_samples_per_s`` is snn_train_fp32's network through ``evaluation.evaluate`` at train.eval_batch_size,
as validation, the final test and snn-eval run it (every layer traced, its spikes and synaptic operations counted).

``launches_per_step`` counts, on the CPU, the kernels one training step (forward, backward, Adam) launches on the
CUDA path with model.kernel=triton and with model.kernel=torch: see LaunchCounter.

What cannot be measured (a library not installed, a variant that fails) is None in the report, with its reason under
``unmeasured``; the rest stands. The exit status is 1 where something failed, 0 where at most a library is missing.

Usage: python scripts/benchmark.py [--seq-length 16] [--batch-size 32] [--threads 2] [--device cpu] [--json FILE]
                                  [--growth 8 16 32 64]
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack, nullcontext
from typing import Any
from unittest import mock

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from snn_train.allocator import keep_freed_memory
from snn_train.lif_kernels import interpreter_defect
from snn_train.surrogates import SURROGATES

VARIANTS = (
    "snn_train_fp32",
    "snn_train_bf16",
    "snn_train_torch_kernels",
    "reference_loop",
    "ann_limit_fp32",
    "ann_limit_bf16",
    "ann_conv1_every_step_fp32",
    "ann_conv1_every_step_bf16",
    "norse",
    "norse_tuned_allocator",
    "spikingjelly",
)
CUDA_ONLY = ("snn_train_torch_kernels",)  # on the CPU, model.kernel=auto is torch: snn_train_fp32
OPTIONAL = {"norse": "norse", "norse_tuned_allocator": "norse", "spikingjelly": "spikingjelly"}  # variant: its library


def snn_train_step(
    args: argparse.Namespace, kernel: str = "auto"
) -> tuple[nn.Module, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """The training application's network and loss (encoder, model, max decoder, cross-entropy)."""
    from snn_train import ConvSNN, load_config
    from snn_train.encoders import build_encoder
    from snn_train.task import decode

    surrogate = [f"model={args.surrogate}"] if args.surrogate else []
    cfg = load_config(
        [f"seq_length={args.seq_length}", f"train.device={args.device}", f"model.kernel={kernel}", *surrogate]
    )
    model = ConvSNN.from_config(cfg.model, (1, 28, 28), cfg.train.compile, cfg.model.kernel)
    encoder = build_encoder(cfg.encoder, cfg.seq_length)

    def loss(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(decode(model(encoder(images)), cfg.decoder), labels)

    return model, loss


class AnnLimit(nn.Module):
    """The same conv/fc layers with ReLU instead of LIF, on the T·B-flattened batch: the hardware limit. With
    ``conv1_once`` a time-invariant input is convolved once per image, as snn-train does, and the ReLU of that repeated
    over time (the copy stands for the LIF layer's output); every later layer runs at batch T·B either way."""

    def __init__(self, conv1_once: bool) -> None:
        super().__init__()
        self.conv1_once = conv1_once
        self.conv1, self.conv2 = nn.Conv2d(1, 32, 5), nn.Conv2d(32, 64, 5)
        self.fc1, self.readout = nn.Linear(1024, 1024), nn.Linear(1024, 10, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, B = x.shape[:2]
        if self.conv1_once and x.stride(0) == 0:
            h = F.relu(self.conv1(x[0].contiguous(memory_format=torch.channels_last)))
            h = h.contiguous(memory_format=torch.channels_last).expand(T, -1, -1, -1, -1).flatten(0, 1)
        else:
            h = F.relu(self.conv1(x.flatten(0, 1)))
        h = F.max_pool2d(h, 2)
        h = F.max_pool2d(F.relu(10 * self.conv2(h)), 2)
        return self.readout(F.relu(self.fc1(h.flatten(1)))).unflatten(0, (T, B))


def ann_step(
    args: argparse.Namespace, conv1_once: bool
) -> tuple[nn.Module, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    model = AnnLimit(conv1_once)

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


def spikingjelly_step(
    args: argparse.Namespace,
) -> tuple[nn.Module, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """The seed network with SpikingJelly's multi-step LIF neurons (its own LIF model: no synaptic current) and its
    fastest backend: chosen by SpikingJelly itself from 2.0 on, CuPy on CUDA before."""
    from spikingjelly.activation_based import functional, neuron

    options = {"step_mode": "m"}
    if "backend" in inspect.signature(neuron.LIFNode).parameters and args.device.startswith("cuda"):
        options["backend"] = "cupy"

    class SpikingJellySeed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(1, 32, 5), nn.Conv2d(32, 64, 5)
            self.fc1, self.out = nn.Linear(1024, 1024), nn.Linear(1024, 10, bias=False)
            self.lif0, self.lif1, self.lif2 = (neuron.LIFNode(**options) for _ in range(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            T, B = x.shape[:2]
            functional.reset_net(self)  # its neurons keep their state between calls
            z = self.lif0(self.conv1(x.flatten(0, 1)).unflatten(0, (T, B)))
            z = F.max_pool2d(z.flatten(0, 1), 2)
            z = self.lif1(10 * self.conv2(z).unflatten(0, (T, B)))
            z = F.max_pool2d(z.flatten(0, 1), 2).flatten(1)
            z = self.lif2(self.fc1(z).unflatten(0, (T, B)))
            return self.out(z)

    model = SpikingJellySeed()

    def loss(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = images.expand(args.seq_length, *images.shape)
        return F.cross_entropy(model(x).max(0).values, labels)

    return model, loss


def build(
    variant: str, args: argparse.Namespace
) -> tuple[nn.Module, Callable[[torch.Tensor, torch.Tensor], torch.Tensor], bool]:
    """(model, loss function, bf16 autocast?) for a variant."""
    if variant != "norse":
        keep_freed_memory()
    if variant == "snn_train_torch_kernels":
        return (*snn_train_step(args, kernel="torch"), False)
    if variant.startswith("snn_train"):
        return (*snn_train_step(args), variant.endswith("bf16"))
    if variant == "reference_loop":
        from snn_train import neurons

        def reference(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
            """lif_sequence's work as the step loop, whatever arguments lif_sequence takes, bound by name."""
            bound = inspect.signature(neurons.lif_sequence).bind(*args, **kwargs)
            bound.apply_defaults()
            a = bound.arguments
            spikes, voltages = neurons.lif_sequence_reference(
                a["currents"], a["p"], a["record_voltage"], a["tau_mem_inv"], a["v_th"]
            )
            return neurons.max_pool_over_time(spikes, a["pool"]), voltages

        mock.patch("snn_train.lif_kernels.lif_sequence", reference).start()  # model.kernel=torch's sequence
        mock.patch("snn_train.model.li_sequence", neurons.li_sequence_reference).start()
        return (*snn_train_step(args, kernel="torch"), False)
    if variant.startswith("ann_"):
        return (*ann_step(args, conv1_once=variant.startswith("ann_limit")), variant.endswith("bf16"))
    if variant == "spikingjelly":
        return (*spikingjelly_step(args), False)
    return (*norse_step(args), False)


def adam(model: nn.Module) -> torch.optim.Optimizer:
    """Adam as snn-train builds it (task.OPTIMIZERS): fused, one kernel per update, on every device."""
    return torch.optim.Adam(model.parameters(), lr=2e-3, fused=True)


NO_KERNEL = {
    torch.ops.aten.empty.memory_format,
    torch.ops.aten.empty_strided.default,
    torch.ops.aten.empty_like.default,
    torch.ops.aten.new_empty.default,
    torch.ops.aten.new_empty_strided.default,
    torch.ops.aten._unsafe_view.default,
}


class LaunchCounter(TorchDispatchMode):
    """Counts the kernels a step would launch on a GPU, from a run on the CPU: each dispatched aten operation that
    computes or copies (not a view, not an allocation) as one, and each Triton kernel and each step compiled by
    torch.compile (one fused kernel on a GPU) as one; the operations inside those (the interpreter's copies, the
    compiled step run eagerly) are not counted. Operations that launch more than one kernel on a GPU (cuDNN's
    convolutions can) count as one."""

    def __init__(self) -> None:
        super().__init__()
        self.launches = 0
        self.inside = 0  # within a counted launch

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if not self.inside and func.namespace == "aten" and not func.is_view and func not in NO_KERNEL:
            self.launches += 1
        return func(*args, **(kwargs or {}))

    def one_launch(self, run: Callable[..., Any]) -> Callable[..., Any]:
        """``run`` counted as one launch, whatever it dispatches."""

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.launches += not self.inside
            self.inside += 1
            try:
                return run(*args, **kwargs)
            finally:
                self.inside -= 1

        return counted


def count_launches(kernel: str, args: argparse.Namespace) -> int:
    """Kernels one training step (forward, backward, fused Adam, after a first step) launches on the CUDA path with
    model.kernel=``kernel`` (triton or torch), counted in this process on the CPU: the Triton kernels run under
    Triton's interpreter (TRITON_INTERPRET=1 must be set before snn_train.triton_lif is imported)."""
    if kernel == "triton" and interpreter_defect():
        sys.exit(f"benchmark.py: cannot count the Triton kernels' launches: {interpreter_defect()}")
    counter = LaunchCounter()
    with ExitStack() as patches:
        patches.enter_context(mock.patch("torch.compile", lambda step, **_: counter.one_launch(step)))
        patches.enter_context(mock.patch("snn_train.lif_cpu.runs", lambda *_: False))  # CUDA tensors: no C++ kernels
        if kernel == "triton":
            from snn_train import triton_lif

            for launcher in {type(triton_lif._forward_kernel), type(triton_lif._backward_kernel)}:
                patches.enter_context(mock.patch.object(launcher, "run", counter.one_launch(launcher.run)))
        model, loss_fn = snn_train_step(argparse.Namespace(**{**vars(args), "device": "cpu"}), kernel)
        optimizer = adam(model)
        images, labels = torch.rand(args.batch_size, 1, 28, 28), torch.randint(0, 10, (args.batch_size,))
        for counting in (False, True):  # the first step creates Adam's state
            with counter if counting else nullcontext():
                loss = loss_fn(images, labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    return counter.launches


def cuda_kernels_per_step(step: Callable[[], float]) -> int:
    """Kernels, copies and fills one step puts on the GPU, as the profiler records them."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as profiled:
        step()
    return sum(event.device_type == torch.autograd.DeviceType.CUDA for event in profiled.events())


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_variant(variant: str, args: argparse.Namespace) -> dict[str, float]:
    """Median training-step time (forward, backward, Adam) and the peak memory of the training steps, in this process
    (taken before snn_train_fp32's inference and evaluation figures, whose larger batches would set it instead)."""
    torch.manual_seed(0)
    device = torch.device(args.device)
    model, loss_fn, bf16 = build(variant, args)
    model.to(device)
    optimizer = adam(model)
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
    result["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else peak_rss_mb()
    if device.type == "cuda":
        result["cuda_kernels_per_step"] = cuda_kernels_per_step(step)
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
        result["evaluation_samples_per_s"] = evaluation_samples_per_s(model, args, device)
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


def evaluation_samples_per_s(model: nn.Module, args: argparse.Namespace, device: torch.device) -> float:
    """Samples per second through ``evaluation.evaluate`` at train.eval_batch_size, as validation, the final test and
    snn-eval run them (every layer traced, spikes and synaptic operations counted): ``--steps`` batches of random
    images after one batch of warm-up."""
    from snn_train import load_config
    from snn_train.data import Split
    from snn_train.encoders import build_encoder
    from snn_train.evaluation import evaluate

    cfg = load_config([f"seq_length={args.seq_length}"])
    encoder = build_encoder(cfg.encoder, cfg.seq_length).to(device)
    size = args.steps * cfg.train.eval_batch_size
    images = torch.randint(0, 256, (size, 28, 28), dtype=torch.uint8, device=device)
    split = Split(images, torch.randint(0, 10, (size,), device=device))
    evaluate(model, encoder, split, cfg.decoder, cfg.train.eval_batch_size, 1, "fp32", 0)
    start = time.perf_counter()
    evaluate(model, encoder, split, cfg.decoder, cfg.train.eval_batch_size, None, "fp32", 0)  # synced by its .tolist()
    return size / (time.perf_counter() - start)


class Unmeasured(Exception):
    """A figure that could not be taken; the message says why in one line."""


def run_in_subprocess(
    variant: str,
    args: argparse.Namespace,
    seq_length: int,
    options: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> Any:
    """What ``--variant`` (or another of ``options``) prints in a fresh process. Raises Unmeasured where the variant's
    library is not installed or the process fails (its error output then goes to ours)."""
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
        *options,
    ]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        if variant in OPTIONAL and f"No module named '{OPTIONAL[variant]}'" in done.stderr:
            raise Unmeasured(f"{OPTIONAL[variant]} not installed")
        sys.stderr.write(f"{variant} {' '.join(options)} failed:\n{done.stderr}")
        lines = done.stderr.strip().splitlines()
        raise Unmeasured(f"failed: {lines[-1] if lines else f'exit status {done.returncode}'}")
    return json.loads(done.stdout.splitlines()[-1])


def measured(unmeasured: dict[str, str], name: str, measure: Callable[[], Any]) -> Any:
    """``measure()``, or None with the reason under ``name`` in ``unmeasured``: one part that cannot run (an anchor's
    backend on some GPU, say) leaves the rest of the report standing."""
    try:
        return measure()
    except Unmeasured as reason:
        unmeasured[name] = str(reason)
        return None


def cpu_model() -> str:
    """The CPU's model name as /proc/cpuinfo gives it (Linux), else the platform's processor string."""
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    return None if numerator is None or denominator is None else round(numerator / denominator, 2)


def ratios(results: dict[str, Any]) -> dict[str, float | None]:
    """The figures the targets are stated in: step time over the ANN limit's (fp32, bf16), throughput and peak memory
    against Norse's, throughput against SpikingJelly's (None where a variant was not measured)."""
    ms = {variant: result and result["train_step_ms"] for variant, result in results.items()}
    memory = {variant: result and result["peak_memory_mb"] for variant, result in results.items()}
    return {
        "fp32_step_over_ann_limit": ratio(ms["snn_train_fp32"], ms["ann_limit_fp32"]),
        "bf16_step_over_ann_limit_bf16": ratio(ms["snn_train_bf16"], ms["ann_limit_bf16"]),
        "fp32_speed_over_norse": ratio(ms["norse"], ms["snn_train_fp32"]),
        "fp32_peak_memory_over_norse": ratio(memory["snn_train_fp32"], memory["norse"]),
        "fp32_speed_over_spikingjelly": ratio(ms["spikingjelly"], ms["snn_train_fp32"]),
    }


def figure(result: dict[str, float] | None, key: str, digits: int = 1) -> float | None:
    return None if result is None else round(result[key], digits)


def measure_all(args: argparse.Namespace, unmeasured: dict[str, str]) -> dict[str, Any]:
    """Every variant, the launch counts (in fresh processes under Triton's interpreter), snn_train_fp32 per surrogate
    and per T of the memory table; what could not be measured is None, with its reason in ``unmeasured``. The default
    surrogate's entry and the table's entry at ``--seq-length`` are snn_train_fp32's own figures: the same command."""
    from snn_train import load_config

    cuda = torch.device(args.device).type == "cuda"
    interpreted = {**os.environ, "TRITON_INTERPRET": "1"}
    fp32 = functools.partial(run_in_subprocess, "snn_train_fp32", args)
    variants = {
        variant: measured(unmeasured, variant, functools.partial(run_in_subprocess, variant, args, args.seq_length))
        for variant in VARIANTS
        if cuda or variant not in CUDA_ONLY
    }
    default_surrogate = load_config([]).model.surrogate
    return {
        "variants": variants,
        "launches": {
            f"cuda_{kernel}": measured(
                unmeasured,
                f"launches_per_step.cuda_{kernel}",
                functools.partial(fp32, args.seq_length, ("--count-launches", kernel), interpreted),
            )
            for kernel in ("triton", "torch")
        },
        "by_surrogate": {
            name: variants["snn_train_fp32"]
            if name == default_surrogate
            else measured(
                unmeasured, f"surrogate {name}", functools.partial(fp32, args.seq_length, ("--surrogate", name))
            )
            for name in sorted(SURROGATES)
        },
        "growth": {
            str(T): variants["snn_train_fp32"]
            if T == args.seq_length
            else measured(unmeasured, f"T={T}", functools.partial(fp32, T))
            for T in args.growth
        },
    }


def report_of(args: argparse.Namespace, measures: dict[str, Any], unmeasured: dict[str, str]) -> dict[str, Any]:
    """The JSON report: configuration, the ratios, each figure per variant, the tables, and what was not measured."""
    results, fp32 = measures["variants"], measures["variants"]["snn_train_fp32"]
    report = {
        "config": {
            "seq_length": args.seq_length,
            "batch_size": args.batch_size,
            "threads": args.threads,
            "device": args.device,
            "cpu": cpu_model(),
            "bf16_native": torch.ops.mkldnn._is_mkldnn_bf16_supported(),  # oneDNN: AVX512-BF16 or AMX on the CPU
            "load_average": [round(load, 2) for load in os.getloadavg()],  # 1, 5, 15 min, at the end: other work
        },
        "ratios": ratios(results),
        **{
            name: {k: figure(v, name, digits) for k, v in results.items()}
            for name, digits in (
                ("train_step_ms", 1),
                ("samples_per_s", 1),
                ("peak_memory_mb", 1),
                ("page_faults_per_step", 0),
                ("first_step_s", 1),
            )
        },
        "inference_samples_per_s": figure(fp32, "inference_samples_per_s"),
        "evaluation_samples_per_s": figure(fp32, "evaluation_samples_per_s"),
        "data_and_encoding_ms": figure(fp32, "data_and_encoding_ms", 2),
        "memory_by_seq_length": {
            T: r and {"train_step_ms": figure(r, "train_step_ms"), "peak_memory_mb": figure(r, "peak_memory_mb")}
            for T, r in measures["growth"].items()
        },
        "train_step_ms_by_surrogate": {k: figure(r, "train_step_ms") for k, r in measures["by_surrogate"].items()},
        "launches_per_step": measures["launches"],
        "unmeasured": unmeasured,
    }
    if torch.device(args.device).type == "cuda":
        report["config"]["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
        report["cuda_kernels_per_step"] = {k: v and v["cuda_kernels_per_step"] for k, v in results.items()}
    return report


def column(value: float | None, width: int) -> str:
    return f"{value:>{width}.2f}" if value is not None else f"{'-':>{width}}"


def print_report(report: dict[str, Any]) -> None:
    """The report as tables, for a reader."""
    config, ms = report["config"], report["train_step_ms"]
    limit, norse = ms["ann_limit_fp32"], ms["norse"]
    print(
        f"T={config['seq_length']} B={config['batch_size']} threads={config['threads']} device={config['device']}, "
        f"{config.get('gpu', config['cpu'])}"
    )
    print(f"bf16 in hardware: {config['bf16_native']}; load average at the end: {config['load_average']}")
    print(
        f"{'variant':<26}{'ms/step':>9}{'samples/s':>11}{'peak MB':>9}{'faults/step':>13}"
        f"{'× ANN limit':>13}{'× Norse speed':>15}"
    )
    for variant, step_ms in ms.items():
        if step_ms is None:
            print(f"{variant:<26}  ({report['unmeasured'][variant]})")
            continue
        print(
            f"{variant:<26}{step_ms:>9.1f}{report['samples_per_s'][variant]:>11.1f}"
            f"{report['peak_memory_mb'][variant]:>9.0f}{report['page_faults_per_step'][variant]:>13.0f}"
            f"{column(ratio(step_ms, limit), 13)}{column(ratio(norse, step_ms), 15)}"
        )
    print("ratios:", ", ".join(f"{name} {value}" for name, value in report["ratios"].items()))
    data_ms, fp32_ms = report["data_and_encoding_ms"], ms["snn_train_fp32"]
    if data_ms is not None:
        print(f"data + encoding: {data_ms:.2f} ms per batch = {100 * data_ms / fp32_ms:.1f} % of the fp32 step")
        print(
            f"first snn_train_fp32 step (includes building the C++ LIF kernels, or loading them from the cache): "
            f"{report['first_step_s']['snn_train_fp32']:.1f} s"
        )
        print(f"inference (no_grad, eval): {report['inference_samples_per_s']:.0f} samples/s")
        print(
            f"evaluation (as validation, the test and snn-eval run it, at train.eval_batch_size): "
            f"{report['evaluation_samples_per_s']:.0f} samples/s"
        )
    for T, r in report["memory_by_seq_length"].items():
        print(f"T={T:>3}: " + (f"{r['train_step_ms']:8.1f} ms/step, peak {r['peak_memory_mb']:7.0f} MB" if r else "-"))
    by_surrogate = report["train_step_ms_by_surrogate"]
    print(
        "snn_train_fp32 by surrogate (model=<name>):", ", ".join(f"{k} {v or '-'} ms" for k, v in by_surrogate.items())
    )
    print(f"kernel launches per training step on the CUDA path (counted on the CPU): {report['launches_per_step']}")
    if "cuda_kernels_per_step" in report:
        print(f"kernels, copies and fills per step on this GPU (profiler): {report['cuda_kernels_per_step']}")
    for name, reason in report["unmeasured"].items():
        print(f"not measured: {name}: {reason}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-length", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", help="write all figures to this file")
    parser.add_argument("--growth", type=int, nargs="+", default=[8, 16, 32, 64], help="T values of the memory table")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--count-launches", choices=("triton", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--surrogate", choices=sorted(SURROGATES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.count_launches:
        print(json.dumps(count_launches(args.count_launches, args)))
        return
    if args.variant:
        print(json.dumps(time_variant(args.variant, args)))
        return

    unmeasured: dict[str, str] = {}
    report = report_of(args, measure_all(args, unmeasured), unmeasured)
    print_report(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    failed = [name for name, reason in unmeasured.items() if reason.startswith("failed")]  # not: a library missing
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
