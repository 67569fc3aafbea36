"""Throughput of the real training step (DataLoader on .npy arrays, augmentation, forward,
backward, optimizer step) against the model alone on ready-made tensors of the same shape.

Both go through ``emonet.training.trainer.train_one_epoch`` with the same model, loss and
optimizer, in the same process, interleaved over several rounds; warm-up steps are not
timed. The ratio real / model-only is the share of the model's speed that the input
pipeline keeps (target: >= 0.85 for resnet18 at 112 px, batch 32, on 2 CPU cores).
It also prints CPU milliseconds per sample (main process plus DataLoader workers) and
their ratio: on a machine shared with other jobs the wall-clock ratio is noise, while
the CPU cost of the input pipeline stays measurable.

Then, for information (no target), data-parallel throughput: ``--ddp N`` processes with
``DistributedDataParallel`` over gloo on loopback, each with the same per-process batch
and ``cores / N`` torch threads, against one process with every core, both on the real
pipeline. On a CPU box the processes share the same cores, so expect no speed-up; on a
GPU box each process drives its own GPU.

    python benchmarks/bench_training.py [--num-workers N] [--steps 20] [--rounds 3] [--ddp 2]
"""

from __future__ import annotations

import argparse
import itertools
import logging
import multiprocessing
import os
import socket
import statistics
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from emonet.config import EmoNetConfig, load_config
from emonet.data.demo import make_demo_data
from emonet.models.devices import resolve_device
from emonet.models.encoders import stream_preprocessing
from emonet.models.network import build_model
from emonet.schema import NUM_EMOTIONS, annotations_path, arrays_dir
from emonet.training.losses import EmoNetLoss
from emonet.training.run_loaders import make_loaders
from emonet.training.seeding import seed_everything
from emonet.training.trainer import train_one_epoch


def _forever(loader: Iterable[Any]) -> Iterator[Any]:
    """Batches across epoch boundaries, as a long training run sees them."""
    while True:
        yield from loader


def _children_cpu_seconds() -> float:
    """CPU time (user + system) of the live child processes: the DataLoader workers.

    Read from ``/proc`` (Linux); 0 elsewhere, where only the main process is counted.
    """
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    total = 0.0
    for child in multiprocessing.active_children():
        try:
            fields = Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return total


def _timed_steps(model, batches: Iterator[Any], steps: int, criterion, optimizer, device) -> tuple[float, float, float]:
    """Run ``steps`` training steps drawn from ``batches``.

    Returns samples per second, CPU seconds per sample (this process and its workers)
    and the share of the wall time spent waiting for the next batch.
    """
    seen, waited = 0, 0.0

    def counted() -> Iterator[Any]:
        nonlocal seen, waited
        iterator = itertools.islice(batches, steps)
        while True:
            before = time.perf_counter()
            batch = next(iterator, None)
            waited += time.perf_counter() - before
            if batch is None:
                return
            seen += batch["body"].shape[0]
            yield batch

    cpu_start = time.process_time() + _children_cpu_seconds()
    start = time.perf_counter()
    train_one_epoch(model, counted(), criterion, optimizer, device, progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    cpu = time.process_time() + _children_cpu_seconds() - cpu_start
    return seen / elapsed, cpu / max(seen, 1), waited / elapsed


def _data_parallel_worker(
    rank: int, world: int, port: int, root: Path, config: dict[str, Any], steps: int, warmup: int, out: Path
) -> None:
    """One process of the data-parallel measurement; writes its samples/s to ``out/rank{rank}``."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        emonet_config = EmoNetConfig.model_validate(config)
        device = resolve_device(emonet_config.train.device)
        seed_everything(0)
        model = build_model(emonet_config.model).to(device)
        trained = DistributedDataParallel(model) if world > 1 else model
        criterion = EmoNetLoss.from_config(emonet_config.loss).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=emonet_config.train.lr)
        train_loader, _ = make_loaders(
            annotations_path(root, "train"),
            annotations_path(root, "val"),
            arrays_dir(root),
            emonet_config,
            device=device,
        )
        batches = _forever(train_loader)
        _timed_steps(trained, batches, warmup, criterion, optimizer, device)
        rate, _, _ = _timed_steps(trained, batches, steps, criterion, optimizer, device)
        (out / f"rank{rank}").write_text(str(rate))
    finally:
        if world > 1:
            dist.destroy_process_group()


def _data_parallel_rate(world: int, root: Path, config: EmoNetConfig, steps: int, warmup: int) -> float:
    """Samples per second of all ``world`` processes together (they step in lockstep)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="emonet_ddp_") as out:
        args = (world, port, root, config.model_dump(mode="json"), steps, warmup, Path(out))
        mp.spawn(_data_parallel_worker, args=args, nprocs=world, join=True)
        return sum(float((Path(out) / f"rank{rank}").read_text()) for rank in range(world))


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=None, help="default: the config's train.num_workers")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round and mode")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before each timed block")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported")
    parser.add_argument("--n-train", type=int, default=300, help="rows of the demo train split")
    parser.add_argument("--no-augment", action="store_true", help="time the pipeline without augmentation")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data-dir", type=Path, default=None, help="reuse a demo archive (made if absent)")
    parser.add_argument("--ddp", type=int, default=2, help="data-parallel processes to compare with 1; 0 skips it")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    # Tiny demo splits leave some emotions without positives; irrelevant to speed.
    warnings.filterwarnings("ignore", module="sklearn")

    train_overrides: dict[str, Any] = {
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "augment": not args.no_augment,
        "device": args.device,
    }
    if args.num_workers is not None:
        train_overrides["num_workers"] = args.num_workers
    config = load_config(model={"backbone": args.backbone, "pretrained": False}, train=train_overrides)
    device = resolve_device(config.train.device)
    # Sampled before this process adds its own threads and workers to the run queue.
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")

    with tempfile.TemporaryDirectory(prefix="emonet_bench_") as tmp:
        root = args.data_dir or Path(tmp) / "demo"
        if not annotations_path(root, "train").is_file():
            make_demo_data(root, seed=0, n_train=args.n_train, n_val=8, n_test=1, size=args.image_size)
        seed_everything(0)
        model = build_model(config.model).to(device)
        if device.type == "cuda":
            model.to(memory_format=torch.channels_last)
        criterion = EmoNetLoss.from_config(config.loss).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.train.lr, weight_decay=config.train.weight_decay)
        train_loader, _ = make_loaders(
            annotations_path(root, "train"), annotations_path(root, "val"), arrays_dir(root), config, device=device
        )
        real = _forever(train_loader)

        # Model alone: one pre-made batch of the loader's shapes and dtypes, reused.
        size, batch = args.image_size, args.batch_size
        synthetic = {
            "body": torch.randn(batch, 3, size, size),
            "emotions": (torch.rand(batch, NUM_EMOTIONS) < 0.1).float(),
            "affect": torch.rand(batch, 2) * 2 - 1,
        }
        if config.model.uses_context:
            side = stream_preprocessing(config)[1].size
            synthetic["context"] = torch.randn(batch, 3, side, side)
        fixed = itertools.repeat(synthetic)
        # After a model-only block the workers' queue is full; let the real warm-up
        # drain it so the timed real steps see the steady state.
        real_warmup = max(args.warmup, config.train.num_workers * 2 + 1)

        rates: dict[str, list[float]] = {"model": [], "real": []}
        cpu: dict[str, list[float]] = {"model": [], "real": []}
        waits: list[float] = []
        for round_index in range(args.rounds):
            for mode, batches, warmup in (("model", fixed, args.warmup), ("real", real, real_warmup)):
                _timed_steps(model, batches, warmup, criterion, optimizer, device)
                rate, cpu_per_sample, wait = _timed_steps(model, batches, args.steps, criterion, optimizer, device)
                rates[mode].append(rate)
                cpu[mode].append(cpu_per_sample)
                if mode == "real":
                    waits.append(wait)
            print(
                f"round {round_index + 1}: model alone {rates['model'][-1]:.1f}, real {rates['real'][-1]:.1f} "
                "samples/s",
                flush=True,
            )
        del real, train_loader  # stop the persistent workers
        if args.ddp > 1:
            # Interleaved rounds, as above, so a change in the machine's load hits both alike.
            ddp_runs: dict[int, list[float]] = {1: [], args.ddp: []}
            for _ in range(args.rounds):
                for world in ddp_runs:
                    ddp_runs[world].append(_data_parallel_rate(world, root, config, args.steps, real_warmup))
            ddp_rates = {world: statistics.median(rates) for world, rates in ddp_runs.items()}

    model_rate, real_rate = statistics.median(rates["model"]), statistics.median(rates["real"])
    model_cpu, real_cpu = statistics.median(cpu["model"]), statistics.median(cpu["real"])
    ratio = real_rate / model_rate
    print(
        f"device {device}, {os.cpu_count()} CPUs, load average before start {load_before:.1f}, "
        f"torch threads {torch.get_num_threads()}, num_workers {config.train.num_workers}, "
        f"augment {config.train.augment}"
    )
    print(f"{args.backbone} {size}px batch {batch}: {args.rounds} rounds x {args.steps} steps (median)")
    print(f"model alone (pre-made tensors): {model_rate:7.1f} samples/s, {model_cpu * 1e3:6.1f} CPU ms/sample")
    print(
        f"real pipeline (loader + aug):   {real_rate:7.1f} samples/s, {real_cpu * 1e3:6.1f} CPU ms/sample "
        f"(main + workers), {statistics.median(waits):.1%} of the time waiting for batches"
    )
    print(f"ratio real / model alone: {ratio:.3f} (target >= 0.85); CPU-cost ratio {model_cpu / real_cpu:.3f}")
    if args.ddp > 1:
        print(
            f"data-parallel (real pipeline, batch {batch} per process, gloo): 1 process {ddp_rates[1]:.1f}, "
            f"{args.ddp} processes {ddp_rates[args.ddp]:.1f} samples/s, ratio "
            f"{ddp_rates[args.ddp] / ddp_rates[1]:.2f} (information only: the processes share {os.cpu_count()} CPUs)"
        )
    if load_before > 0.5:
        print("warning: other processes were running; on a busy machine the wall-clock ratio is mostly noise")
    return ratio


if __name__ == "__main__":
    main()
