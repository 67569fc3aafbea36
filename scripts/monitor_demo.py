"""``make monitor``: the monitoring loop on the demo champion, after ``make demo``.

Writes two labelled batches from the demo generator into an inbox (one drawn like the
training data, one shifted: darker scenes, more hidden faces, another emotion mix),
monitors both with ``models:/emonet-demo@champion`` through the ``emonet-monitor`` flow
(ephemeral Prefect), and prints each decision, the three signals that moved most, and
where to look. A second ``make monitor`` reuses the recorded results.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

DEMO_MODEL = "models:/emonet-demo@champion"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=Path("outputs/monitoring"))
    parser.add_argument("--model", default=DEMO_MODEL)
    args = parser.parse_args(argv)

    from emonet.monitoring.demo import write_demo_batches
    from emonet.monitoring.monitor import MONITORING_EXPERIMENT, MonitoringResult, describe_monitoring
    from flows.monitor import check_model_uri, emonet_monitor

    inbox = args.out_dir / "demo-inbox"
    try:
        check_model_uri(args.model, None)
    except ValueError as error:
        print(f"make monitor: error: {error} (run 'make demo' first)", file=sys.stderr)
        return 2
    if not (inbox / "shifted" / "batch.csv").is_file():
        write_demo_batches(inbox)
    results = emonet_monitor(inbox=inbox, model_uri=args.model, out_dir=args.out_dir / "reports")
    for result in results:
        summary = {key: value for key, value in result.items() if key != "decision"}
        print(describe_monitoring(MonitoringResult(**summary)), end="\n\n")
    print(
        f"Where to look: `make ui`, then the MLflow experiment '{MONITORING_EXPERIMENT}' at http://127.0.0.1:5000 "
        "(tags emonet.drift_detected, metrics drift_p.*, artifacts report.html and signals.csv) and the flow runs "
        f"of emonet-monitor in Prefect at http://127.0.0.1:4200 (artifact 'emonet-monitoring'); reports are also "
        f"under {args.out_dir / 'reports'}."
    )
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main())
