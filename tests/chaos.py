"""Fault drills run inside Ray workers (``runtime_env={"worker_process_setup_hook": ...}``)."""

from __future__ import annotations

import os

POISON_ID = "poison"


def crash_on_poison() -> None:
    """Make a restoring worker die, as from a segfault or the OOM killer, on ``POISON_ID``."""
    from pipeline import stages

    restore = stages.RestoreActor.__call__

    def crashing(self, batch):
        if POISON_ID in batch["id"].to_pylist():
            os._exit(1)
        return restore(self, batch)

    stages.RestoreActor.__call__ = crashing
