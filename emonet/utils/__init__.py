"""Utilities every layer shares, torch-free: atomic file writing and the input guard
(:mod:`~emonet.utils.io`), stop requests from SIGTERM/SIGINT (:mod:`~emonet.utils.stopping`),
where MLflow keeps runs, with the checks that keep a store whole (:mod:`~emonet.utils.store`),
and the processes of a run: the watchdog that ends them with it (:mod:`~emonet.utils.reaper`)
and the main-guard check before workers start (:mod:`~emonet.utils.main_guard`).

The names below are re-exported lazily (``lazy_loader``): importing one submodule loads
only what it needs.
"""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "io": [
            "atomic_open",
            "atomic_path",
            "atomic_temp_files",
            "check_not_inputs",
            "ensure_writable_dir",
            "read_csv",
            "same_file",
            "save_figure_atomic",
            "save_npy_atomic",
            "write_csv_atomic",
            "write_json_atomic",
        ],
        "main_guard": [
            "MissingMainGuardError",
            "check_main_guard",
        ],
        "moved_modules": [
            "MOVED_MODULES",
            "install",
        ],
        "reaper": [
            "EXIT_GRACE_S",
            "POLL_S",
            "TERM_GRACE_S",
            "TOKEN_ENV",
            "ensure_reaper",
            "reap_orphans",
            "watch",
        ],
        "stopping": [
            "TrainingStopped",
            "check_stop",
            "clear_stop",
            "mark_stop_handled",
            "on_stop_requested",
            "request_stop",
            "stop_on_signals",
            "stop_requested",
            "wait_stop_handled",
        ],
        "store": [
            "check_sqlite_store",
            "check_store",
            "check_store_writable",
            "default_artifact_location",
            "default_tracking_uri",
            "sqlite_lock",
            "sqlite_path",
            "without_password",
        ],
    },
)
