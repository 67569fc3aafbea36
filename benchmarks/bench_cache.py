"""Wall time of the pipeline's data steps (face visibility, normalization) on a first run
and on a second run served from Prefect's cache, and their ratio (target <= 0.1).

Runs the `emonet-prepare-data` flow twice on a generated demo archive, with a fresh
result store, against an ephemeral Prefect server. The data steps' time is the span
from the first task's start to the last task's end, as Prefect recorded them; the
flow's whole wall time (which adds Prefect's fixed per-flow-run cost, about a second
for the run's set-up and heartbeat teardown) is printed too.

    .venv/bin/python benchmarks/bench_cache.py [--n-train 600 --n-val 200 --n-test 200]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path


def data_steps_span(flow_run_id) -> float:
    """Seconds from the first task run's start to the last one's end in a flow run."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    starts = [run.start_time for run in runs if run.start_time]
    ends = [run.end_time for run in runs if run.end_time]
    return (max(ends) - min(starts)).total_seconds()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-train", type=int, default=600)
    parser.add_argument("--n-val", type=int, default=200)
    parser.add_argument("--n-test", type=int, default=200)
    parser.add_argument("--size", type=int, default=112, help="side of the demo crops")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from prefect import flow
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    from emonet.data.demo import make_demo_data
    from flows.training_pipeline import prepare_data

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        root = make_demo_data(
            tmp_path / "demo", n_train=args.n_train, n_val=args.n_val, n_test=args.n_test, size=args.size
        )
        rows = args.n_train + args.n_val + args.n_test
        with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: tmp_path / "results"}):
            # The first flow run of a process starts the ephemeral server: keep that out.
            flow(name="warm-up")(lambda: None)()
            spans = []
            for label in ("first", "cached"):
                start = time.perf_counter()
                state = prepare_data(root, tmp_path / "out", return_state=True)
                wall = time.perf_counter() - start
                state.result()  # raises if the flow failed
                spans.append(data_steps_span(state.state_details.flow_run_id))
                print(f"{label:>7} run: data steps {spans[-1]:6.2f} s   (flow wall time {wall:6.2f} s)")
    print(f"rows: {rows}; data steps cached / first: {spans[1] / spans[0]:.3f} (target <= 0.1)")


if __name__ == "__main__":
    main()
