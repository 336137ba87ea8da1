"""Helpers shared by the benchmark scripts; the tables and configs are the evaluation's own (evaluation/report.py)."""

from __future__ import annotations

import os
import threading
import time

from multimodal_rec.evaluation.report import (  # noqa: F401  (re-exported for the bench scripts)
    COLUMNS,
    add_rows,
    data_overrides,
    machine,
    markdown_table,
    print_tables,
    train_config,
)


def exit_with_parent(parent: int) -> None:
    """Pool-worker initializer: the worker ends once the process that started it is gone (killed, say), rather
    than training on into its run folder as an orphan."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(2)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()
