"""Benchmark of the face-visibility step: the Tasks face landmarker's milliseconds per crop
next to the legacy Face Mesh's, and the project's process pool (``score_crops``) and Dask
path (shards on a ``distributed.LocalCluster``) against their own sequential loop.

Per-crop times: one landmarker (or, with ``--legacy-python``, one legacy
``mp.solutions.face_mesh.FaceMesh(static_image_mode=True, max_num_faces=1,
refine_landmarks=True)`` in that interpreter, e.g. a throwaway venv with
``mediapipe==0.10.21 'numpy<2'``), each crop loaded from its .npy and scored one after the
other, on the same crops in the same run; also split by kind (whole face, face cut by
the border, no face: the detector alone) to show where the time goes.

Speed-ups: each timing scores N1 and N2 crops; per-crop time is the slope
``(t2 - t1) / (N2 - N1)``, so start-up cancels, and start-up is the intercept
``t1 - N1 * slope``. The sequential baseline is ``score_crops(..., workers=1)`` and the
pool is ``score_crops(..., workers=W)``, each in a fresh interpreter, as a CLI run is
(so the pool's figure includes starting the forkserver and the workers). The Dask
timings run on one cluster of W single-threaded worker processes, started once: each
worker scores shards of ``--dask-shard`` crops with ``score_crops(..., workers=1)``, as
the flow's shard task does there. Times are the best of ``--repeats`` runs.

``--demo N`` also compares the two models' scores on the first N train crops of a demo
archive (seed 0) by the face each crop was drawn with (whole, part, none).

Run: ``python benchmarks/bench_visibility.py [--legacy-python /tmp/legacy-venv/bin/python]
[--sizes 64,224 --n1 200 --n2 1600 --demo 500]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from distributed import Client, LocalCluster

from emonet.data.arrays import load_array
from emonet.data.demo import example_crop, make_demo_data
from emonet.data.face_visibility import FaceVisibilityScorer, default_workers, score_crops
from emonet.schema import arrays_dir, crop_name

# Whole faces, faces cut by the border and bodies without a face, 40% with a face as
# in the archive's val split (finding no face is about 3x cheaper than meshing one).
KINDS = ("whole", "none", "partial", "none", "none")

# The legacy loop, run by --legacy-python (numpy and mediapipe 0.10.21 only, no emonet):
# the same loading and score as FaceVisibilityScorer, with the seed's Face Mesh settings.
LEGACY_LOOP = r"""
import json, sys, time
import numpy as np
import mediapipe as mp

job = json.loads(open(sys.argv[1]).read())
names = job["names"]
result = {"seconds": {}, "scores": [], "per_crop": []}
with mp.solutions.face_mesh.FaceMesh(static_image_mode=True, max_num_faces=1, refine_landmarks=True) as mesh:
    mesh.process(np.zeros((64, 64, 3), np.uint8))  # the first call sets the graph up
    for n in job["counts"]:
        best = float("inf")
        for _ in range(job["repeats"]):
            scores, per_crop = [], []
            start, cpu = time.perf_counter(), time.process_time()
            for name in names[:n]:
                tick = time.perf_counter()
                crop = np.ascontiguousarray(np.load(job["folder"] + "/" + name))
                faces = mesh.process(crop).multi_face_landmarks
                if not faces:
                    scores.append(0.0)
                else:
                    xy = np.array([(p.x, p.y) for p in faces[0].landmark])
                    scores.append(100.0 * np.count_nonzero(np.all((xy >= 0) & (xy <= 1), axis=1)) / len(xy))
                per_crop.append(time.perf_counter() - tick)
            best = min(best, time.perf_counter() - start)
            result["cpu_per_crop"] = (time.process_time() - cpu) / n
        result["seconds"][str(n)] = best
    result["scores"], result["per_crop"] = scores, per_crop
print(json.dumps(result))
"""


def write_crops(folder: Path, n: int, size: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Write ``n`` RGB uint8 crops of ``size`` x ``size`` as .npy; return their names and kinds."""
    rng = np.random.default_rng(seed)
    # Rendered at size + 8 and cut at a random offset: no two files hold the same array.
    bases = {kind: example_crop(kind, size + 8) for kind in set(KINDS)}
    names, kinds = [], []
    for i in range(n):
        dy, dx = rng.integers(0, 9, size=2)
        kind = KINDS[i % len(KINDS)]
        crop = bases[kind][dy : dy + size, dx : dx + size]
        name = f"crop_arr_bench_{i}.npy"
        np.save(folder / name, np.ascontiguousarray(crop))
        names.append(name)
        kinds.append(kind)
    return names, kinds


def time_tasks_loop(folder: Path, names: list[str], counts: tuple[int, ...], repeats: int) -> dict:
    """The Tasks landmarker's own loop, as LEGACY_LOOP does it: best seconds per count, and
    the scores, per-crop seconds and CPU seconds per crop (all of the process's threads)
    of the last run of the largest count."""
    result: dict = {"seconds": {}}
    with FaceVisibilityScorer() as scorer:
        scorer(np.zeros((64, 64, 3), np.uint8))  # the first call sets the graph up
        for n in counts:
            best = float("inf")
            for _ in range(repeats):
                scores, per_crop = [], []
                start, cpu = time.perf_counter(), time.process_time()
                for name in names[:n]:
                    tick = time.perf_counter()
                    scores.append(scorer(load_array(folder, name)))
                    per_crop.append(time.perf_counter() - tick)
                best = min(best, time.perf_counter() - start)
                result["cpu_per_crop"] = (time.process_time() - cpu) / n
            result["seconds"][str(n)] = best
    result["scores"], result["per_crop"] = scores, per_crop
    return result


def time_legacy_loop(python: str, folder: Path, names: list[str], counts: tuple[int, ...], repeats: int) -> dict:
    """LEGACY_LOOP in ``python``; same result layout as :func:`time_tasks_loop`."""
    with tempfile.TemporaryDirectory() as tmp:
        job = Path(tmp) / "job.json"
        job.write_text(json.dumps({"folder": str(folder), "names": names, "counts": list(counts), "repeats": repeats}))
        # MediaPipe's native log lines go to stderr: kept only to explain a failure.
        proc = subprocess.run([python, "-c", LEGACY_LOOP, str(job)], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"the legacy Face Mesh loop failed in {python} ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def time_project(folder: Path, names: list[str], workers: int) -> tuple[float, np.ndarray]:
    """Seconds for ``score_crops`` in a fresh interpreter, and its scores."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        out = Path(handle.name)
    try:
        cmd = [sys.executable, __file__, "--_child", str(folder), str(len(names)), str(workers), str(out)]
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


def time_dask(client: Client, folder: Path, names: list[str], shard: int) -> tuple[float, np.ndarray]:
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


def fit(t1: float, t2: float, n1: int, n2: int) -> tuple[float, float]:
    """Per-crop seconds (the slope between N1 and N2) and start-up seconds (intercept)."""
    slope = (t2 - t1) / (n2 - n1)
    if slope <= 0:
        print("note: noise exceeds the difference between the two sizes (raise --n2 or --repeats); shown as nan")
        return float("nan"), float("nan")
    return slope, t1 - slope * n1


def by_kind(per_crop: list[float], kinds: list[str]) -> str:
    """Mean milliseconds per crop of each kind."""
    times = np.asarray(per_crop)
    return "  ".join(
        f"{kind} {1e3 * times[np.asarray(kinds[: len(times)]) == kind].mean():.2f}"
        for kind in ("whole", "partial", "none")
    )


def bench_size(args: argparse.Namespace, size: int, workers: int, client: Client) -> dict[str, float]:
    """Time every way on N2 crops of ``size`` px; print a table; return the speed-ups."""
    n1, n2 = args.n1, args.n2
    with tempfile.TemporaryDirectory(prefix="bench_visibility_") as tmp:
        folder = Path(tmp)
        names, kinds = write_crops(folder, n2, size)
        tasks = time_tasks_loop(folder, names, (n1, n2), args.repeats)
        legacy = (
            time_legacy_loop(args.legacy_python, folder, names, (n1, n2), args.repeats) if args.legacy_python else None
        )
        before = cpu_jiffies()
        sequential = {n: best_of(args.repeats, time_project, folder, names[:n], 1) for n in (n1, n2)}
        sequential_busy = busy_percent(before, cpu_jiffies())
        pool = {n: best_of(args.repeats, time_project, folder, names[:n], workers) for n in (n1, n2)}
        time_dask(client, folder, names[: 2 * workers], 1)  # each worker creates its landmarker
        dask = {n: best_of(args.repeats, time_dask, client, folder, names[:n], args.dask_shard) for n in (n1, n2)}

    reference = sequential[n2][1]
    if not np.array_equal(np.asarray(tasks["scores"]), reference):
        sys.exit(f"{size} px: the landmarker loop and score_crops disagree")
    for label, runs in (("score_crops with a pool", pool), ("the Dask path", dask)):
        if not np.array_equal(runs[n2][1], reference):
            diff = np.flatnonzero(runs[n2][1] != reference)
            sys.exit(f"{size} px: scores differ between {label} and workers=1 at {len(diff)} crops, first {diff[:5]}")

    print(f"\n{size} px crops: {np.mean(reference > 0):.0%} with a face, {np.mean(reference == 100):.0%} whole")
    print(f"{'one model, one crop after another':40}{'ms/crop':>9}{'CPU ms':>8}   by kind (mean ms)")
    tasks_slope, _ = fit(tasks["seconds"][str(n1)], tasks["seconds"][str(n2)], n1, n2)
    print(
        f"{'Tasks FaceLandmarker (mediapipe 1.2.3)':40}{1e3 * tasks_slope:9.2f}{1e3 * tasks['cpu_per_crop']:8.2f}   "
        f"{by_kind(tasks['per_crop'], kinds)}"
    )
    legacy_ratio = float("nan")
    if legacy is None:
        print("legacy Face Mesh: skipped (give --legacy-python, e.g. a venv with mediapipe==0.10.21 'numpy<2')")
    else:
        legacy_slope, _ = fit(legacy["seconds"][str(n1)], legacy["seconds"][str(n2)], n1, n2)
        legacy_ratio = tasks_slope / legacy_slope
        print(
            f"{'legacy Face Mesh (mediapipe 0.10.21)':40}{1e3 * legacy_slope:9.2f}"
            f"{1e3 * legacy['cpu_per_crop']:8.2f}   "
            f"{by_kind(legacy['per_crop'], kinds)}"
        )
        cpu_ratio = tasks["cpu_per_crop"] / legacy["cpu_per_crop"]
        print(f"Tasks / legacy time per crop: {legacy_ratio:.2f} (CPU time {cpu_ratio:.2f})")
        print(f"scores: {compare(np.asarray(legacy['scores']), reference, kinds)}")

    seq_slope, seq_start = fit(sequential[n1][0], sequential[n2][0], n1, n2)
    rows = [("score_crops, workers=1", seq_slope, seq_start, sequential[n2][0], 1.0)]
    for label, runs in ((f"process pool ({workers} workers)", pool), (f"Dask ({workers} processes)", dask)):
        slope, start_up = fit(runs[n1][0], runs[n2][0], n1, n2)
        rows.append((label, slope, start_up, runs[n2][0], seq_slope / slope))
    print(f"\n{'':28}{'ms/crop':>9}{'start-up s':>12}{f't({n2}) s':>11}{'speed-up':>10}")
    for label, slope, start_up, total, speedup in rows:
        print(f"{label:28}{1e3 * slope:9.2f}{start_up:12.2f}{total:11.2f}{speedup:9.2f}x")
    return {
        "pool": rows[1][4],
        "pool_start": rows[1][2],
        "dask": rows[2][4],
        "busy": sequential_busy,
        "legacy_ratio": legacy_ratio,
    }


def compare(legacy: np.ndarray, tasks: np.ndarray, kinds: list[str]) -> str:
    """Agreement of the two models' scores, per kind of crop (whole, part, none)."""
    parts = []
    labels = {"whole": 100.0, "full": 100.0, "none": 0.0, "absent": 0.0}
    for kind in sorted(set(kinds), key=("whole", "full", "partial", "none", "absent").index):
        mask = np.asarray(kinds[: len(tasks)]) == kind
        diff = np.abs(tasks[mask] - legacy[mask])
        same_class = np.mean(_face_class(tasks[mask]) == _face_class(legacy[mask]))
        expected = labels.get(kind)
        lost = np.count_nonzero((tasks[mask] == 0) & (legacy[mask] > 0))
        found = np.count_nonzero((tasks[mask] > 0) & (legacy[mask] == 0))
        found_scores = tasks[mask][tasks[mask] > 0]
        parts.append(
            f"{kind} ({mask.sum()}): same class {same_class:.1%}, |diff| mean {diff.mean():.2f} max {diff.max():.2f}"
            + ("" if expected is None else f", Tasks at {expected:g}: {np.mean(tasks[mask] == expected):.1%}")
            + (f", a face only for legacy {lost} / only for Tasks {found}" if lost or found else "")
            + (
                f", Tasks scores {found_scores.min():.1f}-{found_scores.max():.1f}"
                if expected is None and found_scores.size
                else ""
            )
        )
    return "; ".join(parts)


def _face_class(scores: np.ndarray) -> np.ndarray:
    """0 no face, 1 part of a face, 2 whole face."""
    return np.where(scores == 100.0, 2, np.where(scores > 0.0, 1, 0))


def compare_on_demo(python: str, n: int) -> None:
    """Score the first ``n`` train crops of a demo archive (seed 0) with both models."""
    with tempfile.TemporaryDirectory(prefix="bench_visibility_demo_") as tmp:
        root = make_demo_data(Path(tmp) / "demo", seed=0, n_train=n, n_val=1, n_test=1)
        manifest = json.loads((root / "demo_manifest.json").read_text())
        kinds = manifest["face_modes"]["train"][:n]
        names = [crop_name("train", i) for i in range(n)]
        folder = arrays_dir(root)
        tasks = np.asarray(time_tasks_loop(folder, names, (n,), 1)["scores"])
        legacy = np.asarray(time_legacy_loop(python, folder, names, (n,), 1)["scores"])
    print(f"\ndemo archive (seed 0), first {n} train crops, Tasks vs legacy Face Mesh by the face drawn:")
    for part in compare(legacy, tasks, kinds).split("; "):
        print(f"  {part}")
    both_part = (_face_class(tasks) == 1) & (_face_class(legacy) == 1)
    diff = np.abs(tasks - legacy)[both_part]
    print(
        f"  crops both score as part of a face ({both_part.sum()}): |diff| mean {diff.mean():.2f} max {diff.max():.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n1", type=int, default=200, help="crops in the small run")
    parser.add_argument("--n2", type=int, default=1600, help="crops in the large run")
    parser.add_argument("--sizes", default="64,224", help="crop sides in pixels, comma-separated")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores)")
    parser.add_argument("--dask-shard", type=int, default=25, help="crops per Dask task")
    parser.add_argument("--repeats", type=int, default=2, help="runs per timing; the best is kept")
    parser.add_argument("--legacy-python", default=None, help="a Python with mediapipe==0.10.21 (legacy Face Mesh)")
    parser.add_argument("--demo", type=int, default=0, help="compare both models on this many demo crops")
    args = parser.parse_args()
    if not 0 < args.n1 < args.n2:
        parser.error(f"need 0 < n1 < n2, got n1={args.n1} n2={args.n2}")
    if args.demo and not args.legacy_python:
        parser.error("--demo compares with the legacy Face Mesh: give --legacy-python too")
    sizes = [int(size) for size in args.sizes.split(",")]
    workers = args.workers or default_workers()
    load = os.getloadavg()[0]
    print(f"{args.n2} crops per size; {workers} workers; {os.cpu_count()} cores; load average {load:.1f}")

    cluster = LocalCluster(
        n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
    )
    with cluster, Client(cluster) as client:
        results = {size: bench_size(args, size, workers, client) for size in sizes}
    if args.demo:
        compare_on_demo(args.legacy_python, args.demo)

    print()
    for size, result in results.items():
        print(
            f"{size} px: steady-state speed-up {result['pool']:.2f}x process pool (target >= 1.85), "
            f"{result['dask']:.2f}x Dask (target >= 1.7) on {workers} cores; "
            f"pool start-up {result['pool_start']:.2f} s "
            f"(target < 3 s); Tasks / legacy time per crop {result['legacy_ratio']:.2f}"
        )
    print(f"machine's ceiling now (plain numpy work, {workers} processes): {parallel_ceiling(workers):.2f}x")
    # The sequential runs keep one core busy: anything above 100/cores % is other work,
    # which takes cores from the parallel runs and skews the ratios.
    alone = 100.0 / (os.cpu_count() or 1)
    busy = max(result["busy"] for result in results.values())
    print(f"machine busy during the sequential runs: up to {busy:.0f}% ({alone:.0f}% if nothing else runs)")
    if load > 0.5 or busy > alone + 15:
        print(f"note: other processes were running (load average {load:.1f} at the start): figures are skewed")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_child":
        _child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
    else:
        main()
