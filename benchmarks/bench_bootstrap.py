"""The vectorised bootstrap against the obvious loop, at EMOTIC's size.

Synthetic data shaped like the EMOTIC test split (7,000 rows, 26 labels, prevalence 1-55%,
mAP about 26).
Times :func:`emonet.metrics.bootstrap.bootstrap_intervals` (both mAPs, 1,000 resamples) and the
paired difference, then the naive way on a few resamples (copy the drawn rows, score
each label with scikit-learn's ``average_precision_score`` and the 11-point AP),
extrapolated to 1,000 resamples, and prints the ratio. Also checks that both ways give
the same per-resample mAP. Target: the vectorised intervals within 10 s on 2 cores.

    .venv/bin/python benchmarks/bench_bootstrap.py [--rows 7000] [--resamples 1000] [--naive 5]
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import numpy as np
from sklearn.exceptions import UndefinedMetricWarning

from emonet.metrics import mean_average_precision_score, mean_voc11_average_precision_score, resampled_average_precision
from emonet.metrics.bootstrap import bootstrap_counts, bootstrap_intervals, paired_bootstrap_map_difference

TARGET_SECONDS = 10.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=7000)
    parser.add_argument("--labels", type=int, default=26)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--naive", type=int, default=5, help="resamples the naive loop scores")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    y_true = (rng.random((args.rows, args.labels)) < np.geomspace(0.01, 0.55, args.labels)).astype(int)
    y_prob = np.clip(0.1 * y_true + rng.random((args.rows, args.labels)), 0.0, 1.0)  # mAP about 26
    other = np.clip(0.08 * y_true + rng.random((args.rows, args.labels)), 0.0, 1.0)
    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")

    start = time.perf_counter()
    intervals = bootstrap_intervals(y_true, y_prob, n_resamples=args.resamples)
    vectorised = time.perf_counter() - start
    start = time.perf_counter()
    paired_bootstrap_map_difference(y_true, y_prob, other, n_resamples=args.resamples)
    paired = time.perf_counter() - start

    draws = np.random.default_rng(0).integers(0, args.rows, size=(args.naive, args.rows))
    counts = bootstrap_counts(args.rows, args.naive, seed=0)
    start = time.perf_counter()
    naive = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        for rows in draws:
            present = y_true[rows].sum(axis=0) > 0
            naive.append(
                (
                    mean_average_precision_score(y_true[rows][:, present], y_prob[rows][:, present]),
                    mean_voc11_average_precision_score(y_true[rows][:, present], y_prob[rows][:, present]),
                )
            )
    naive_total = (time.perf_counter() - start) / args.naive * args.resamples
    fast = np.nanmean(
        [resampled_average_precision(y_true[:, j], y_prob[:, j], counts) for j in range(args.labels)], axis=0
    )  # (2, naive): both protocols per resample
    gap = np.abs(fast.T - np.array(naive)).max()

    print(
        f"vectorised intervals (mAP + mAP_voc11), {args.rows:,} x {args.labels} x {args.resamples:,}: "
        f"{vectorised:.2f} s (target <= {TARGET_SECONDS:.0f} s: {'met' if vectorised <= TARGET_SECONDS else 'MISSED'})"
    )
    print(f"paired mAP difference, same size: {paired:.2f} s")
    print(
        f"naive loop, extrapolated from {args.naive} resamples: {naive_total:.1f} s "
        f"-> speed-up {naive_total / vectorised:.1f}x"
    )
    print(f"largest per-resample difference between the two ways: {gap:.1e}")
    print(f"mAP {intervals['mAP']}\nmAP_voc11 {intervals['mAP_voc11']}")
    print(f"load average after: {os.getloadavg()[0]:.2f} (another process on 2 cores skews the times)")


if __name__ == "__main__":
    main()
