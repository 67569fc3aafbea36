"""Benchmark of the face-visibility step: the project's process pool (``score_crops``)
and its Dask path (shards scored on a ``distributed.LocalCluster``) against the seed's
plain sequential loop with one Face Mesh, in steady state and at start-up, on small
crops (about 2 ms each on a quiet machine) and on 224 px crops.

Each timing scores N1 and N2 crops; per-crop time is the slope ``(t2 - t1) / (N2 - N1)``,
so start-up cancels, and start-up is the intercept ``t1 - N1 * slope``. Every pool
timing runs in a fresh interpreter, as a CLI run does, so it includes starting the
forkserver and the workers. The Dask timings run on one cluster of ``--workers``
single-threaded worker processes, started once: each worker scores shards of
``--dask-shard`` crops with ``score_crops(..., workers=1)``, as the flow's shard task does
there (Prefect's own per-shard cost, a few calls to its API, is left out: the flow's
shards hold 2,000 crops). Times are the best of ``--repeats`` runs.
Run: ``python benchmarks/bench_visibility.py [--sizes 64,224 --n1 200 --n2 1600]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from emonet.visibility import default_workers, example_crop, score_crops

# Whole faces, faces cut by the border and bodies without a face, 40% with a face as
# in the archive's val split (finding no face is about 3x cheaper than meshing one).
KINDS = ("whole", "none", "partial", "none", "none")


def write_crops(folder: Path, n: int, size: int, seed: int = 0) -> list[str]:
    """Write ``n`` RGB uint8 crops of ``size`` x ``size`` as .npy; return their names."""
    rng = np.random.default_rng(seed)
    # Rendered at size + 8 and cut at a random offset: no two files hold the same array.
    bases = {kind: example_crop(kind, size + 8) for kind in set(KINDS)}
    names = []
    for i in range(n):
        dy, dx = rng.integers(0, 9, size=2)
        crop = bases[KINDS[i % len(KINDS)]][dy : dy + size, dx : dx + size]
        name = f"crop_arr_bench_{i}.npy"
        np.save(folder / name, np.ascontiguousarray(crop))
        names.append(name)
    return names


def time_project(folder: Path, names: list[str], workers: int) -> tuple[float, np.ndarray]:
    """Seconds for ``score_crops`` in a fresh interpreter, and its scores."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        out = Path(handle.name)
    try:
        cmd = [sys.executable, __file__, "--_child", str(folder), str(len(names)), str(workers), str(out)]
        # MediaPipe's native log lines go to stderr: kept only to explain a failure.
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            sys.exit(f"score_crops run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        result = json.loads(out.read_text())
    finally:
        out.unlink(missing_ok=True)
    return result["seconds"], np.asarray(result["scores"], dtype=np.float64)


def _child(folder: str, n: int, workers: int, out: str) -> None:
    names = [f"crop_arr_bench_{i}.npy" for i in range(n)]
    start = time.perf_counter()
    scores = score_crops(folder, names, workers=workers, progress=False)
    seconds = time.perf_counter() - start
    Path(out).write_text(json.dumps({"seconds": seconds, "scores": scores.tolist()}))


def time_seed_loop(folder: Path, names: list[str]) -> tuple[float, np.ndarray]:
    """Seconds for the seed's way: one Face Mesh, one crop after the other."""
    import mediapipe as mp

    start = time.perf_counter()
    scores = np.empty(len(names))
    with mp.solutions.face_mesh.FaceMesh(static_image_mode=True, max_num_faces=1, refine_landmarks=True) as mesh:
        for i, name in enumerate(names):
            crop = np.load(folder / name)
            result = mesh.process(crop)
            if not result.multi_face_landmarks:
                scores[i] = 0.0
                continue
            points = result.multi_face_landmarks[0].landmark
            inside = sum(1 for p in points if 0.0 <= p.x <= 1.0 and 0.0 <= p.y <= 1.0)
            scores[i] = 100.0 * inside / len(points)
    return time.perf_counter() - start, scores


def time_dask(client, folder: Path, names: list[str], shard: int) -> tuple[float, np.ndarray]:
    """Seconds to score ``names`` in shards on the cluster behind ``client``, and the scores."""
    start = time.perf_counter()
    # workers=1 and progress=False passed by position: `workers` is also a keyword of
    # Client.submit (where to run), which would take it.
    futures = [
        client.submit(score_crops, str(folder), names[i : i + shard], 1, False, pure=False)
        for i in range(0, len(names), shard)
    ]
    scores = np.concatenate(client.gather(futures))
    return time.perf_counter() - start, scores


def cpu_jiffies() -> tuple[int, int] | None:
    """(idle, total) CPU time of the whole machine so far, from /proc/stat (Linux)."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    return fields[3] + fields[4], sum(fields)


def busy_percent(start: tuple[int, int] | None, end: tuple[int, int] | None) -> float:
    """Share of all cores' time spent busy between two ``cpu_jiffies`` readings."""
    if start is None or end is None or end[1] == start[1]:
        return float("nan")
    return 100.0 * (1.0 - (end[0] - start[0]) / (end[1] - start[1]))


def _numpy_work(steps: int) -> float:
    array = np.random.default_rng(0).random((256, 256))
    for _ in range(steps):
        array = np.sin(array) + 0.1
    return float(array.sum())


def parallel_ceiling(workers: int, steps: int = 600) -> float:
    """Speed-up of ``workers`` processes over one on plain CPU-bound numpy work.

    The best ``score_crops`` can reach on this machine now: on a shared or virtual
    machine it is below the number of cores.
    """
    from multiprocessing import get_context

    with get_context("forkserver").Pool(workers) as pool:
        pool.map(_numpy_work, [1] * workers)  # start the workers before timing
        start = time.perf_counter()
        for _ in range(workers):
            _numpy_work(steps)
        serial = time.perf_counter() - start
        start = time.perf_counter()
        pool.map(_numpy_work, [steps] * workers)
        parallel = time.perf_counter() - start
    return serial / parallel


def best_of(repeats: int, fn, *args) -> tuple[float, np.ndarray]:
    runs = [fn(*args) for _ in range(repeats)]
    return min(runs, key=lambda run: run[0])


def fit(times: dict[int, tuple[float, np.ndarray]], n1: int, n2: int) -> tuple[float, float]:
    """Per-crop seconds (the slope between N1 and N2) and start-up seconds (intercept)."""
    t1, t2 = times[n1][0], times[n2][0]
    slope = (t2 - t1) / (n2 - n1)
    return slope, t1 - slope * n1


def bench_size(args: argparse.Namespace, size: int, workers: int, client) -> dict[str, float]:
    """Time the three ways on N2 crops of ``size`` px; print a table; return the speed-ups."""
    n1, n2 = args.n1, args.n2
    with tempfile.TemporaryDirectory(prefix="bench_visibility_") as tmp:
        folder = Path(tmp)
        names = write_crops(folder, n2, size)
        before = cpu_jiffies()
        seed = {n: best_of(args.repeats, time_seed_loop, folder, names[:n]) for n in (n1, n2)}
        seed_busy = busy_percent(before, cpu_jiffies())
        pool = {n: best_of(args.repeats, time_project, folder, names[:n], workers) for n in (n1, n2)}
        time_dask(client, folder, names[: 2 * workers], 1)  # each worker creates its Face Mesh
        dask = {n: best_of(args.repeats, time_dask, client, folder, names[:n], args.dask_shard) for n in (n1, n2)}

    for label, runs in (("score_crops", pool), ("the Dask path", dask)):
        if not np.array_equal(runs[n2][1], seed[n2][1]):
            diff = np.flatnonzero(runs[n2][1] != seed[n2][1])
            sys.exit(f"{size} px: scores differ between {label} and the seed loop at {len(diff)} crops, first {diff[:5]}")
    scores = seed[n2][1]
    seed_slope, seed_start = fit(seed, n1, n2)
    rows = [("seed loop (1 Face Mesh)", seed_slope, seed_start, seed[n2][0], 1.0)]
    for label, runs in ((f"process pool ({workers} workers)", pool), (f"Dask ({workers} processes)", dask)):
        slope, start_up = fit(runs, n1, n2)
        if seed_slope <= 0 or slope <= 0:
            sys.exit("noise exceeds the difference between the two sizes: raise --n2 (or --repeats)")
        rows.append((label, slope, start_up, runs[n2][0], seed_slope / slope))
    print(f"\n{size} px crops: {np.mean(scores > 0):.0%} with a face, {np.mean(scores == 100):.0%} whole; scores agree")
    print(f"{'':28}{'ms/crop':>9}{'start-up s':>12}{f't({n2}) s':>11}{'speed-up':>10}")
    for label, slope, start_up, total, speedup in rows:
        print(f"{label:28}{1e3 * slope:9.2f}{start_up:12.2f}{total:11.2f}{speedup:9.2f}x")
    return {"pool": rows[1][4], "pool_start": rows[1][2], "dask": rows[2][4], "seed_busy": seed_busy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n1", type=int, default=200, help="crops in the small run")
    parser.add_argument("--n2", type=int, default=1600, help="crops in the large run")
    parser.add_argument("--sizes", default="64,224", help="crop sides in pixels, comma-separated")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores)")
    parser.add_argument("--dask-shard", type=int, default=25, help="crops per Dask task")
    parser.add_argument("--repeats", type=int, default=2, help="runs per timing; the best is kept")
    args = parser.parse_args()
    if not 0 < args.n1 < args.n2:
        parser.error(f"need 0 < n1 < n2, got n1={args.n1} n2={args.n2}")
    sizes = [int(size) for size in args.sizes.split(",")]
    workers = args.workers or default_workers()
    load = os.getloadavg()[0]
    print(f"{args.n2} crops per size; {workers} workers; {os.cpu_count()} cores")

    from distributed import Client, LocalCluster

    cluster = LocalCluster(
        n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
    )
    with cluster, Client(cluster) as client:
        results = {size: bench_size(args, size, workers, client) for size in sizes}

    print()
    for size, result in results.items():
        print(
            f"{size} px: steady-state speed-up {result['pool']:.2f}x process pool (target >= 1.85), "
            f"{result['dask']:.2f}x Dask (target >= 1.7) on {workers} cores; pool start-up {result['pool_start']:.2f} s "
            "(target < 3 s)"
        )
    print(f"machine's ceiling now (plain numpy work, {workers} processes): {parallel_ceiling(workers):.2f}x")
    # The seed loop keeps one core busy: anything above 100/cores % is other work,
    # which takes cores from the parallel runs and skews the ratios.
    alone = 100.0 / (os.cpu_count() or 1)
    seed_busy = max(result["seed_busy"] for result in results.values())
    print(f"machine busy during the seed loops: up to {seed_busy:.0f}% ({alone:.0f}% if nothing else runs)")
    if load > 0.5 or seed_busy > alone + 15:
        print(f"note: other processes were running (load average {load:.1f} at the start): figures are skewed")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_child":
        _child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
    else:
        main()
