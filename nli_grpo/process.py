"""This process within a job: whether it is the main one (rank 0, the one that writes results) and
the stop request that SIGUSR2 / SIGTERM set (Slurm's warning before a time limit or preemption).
Light: the job, the stages and the login side all use it."""

from __future__ import annotations

import logging
import os
import signal
import threading

log = logging.getLogger("nli_grpo.process")


def is_main_process() -> bool:
    """Rank 0 of a torchrun job, or a single-process run: the one that writes results."""
    return int(os.environ.get("RANK", "0")) == 0


class StopRequest:
    """Set by SIGUSR2 / SIGTERM; the trainer checks it after every optimizer step, the evaluation
    between sets."""

    def __init__(self):
        self.event = threading.Event()
        self.signal_name: str | None = None

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGUSR2, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        self.signal_name = signal.Signals(signum).name
        log.warning("received %s: saving a checkpoint after this step, then exiting", self.signal_name)
        self.event.set()

    def is_set(self) -> bool:
        return self.event.is_set()
