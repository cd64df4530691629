"""Ctrl-C (SIGINT) and SIGTERM end training at the next optimizer-step boundary with everything saved.

Lightning turns Ctrl-C into a KeyboardInterrupt wherever the main thread happens to be (mid-backward, mid
optimizer step) and exits with status 1. Here the signal only raises a flag; the step in flight finishes,
then a checkpoint (`last.ckpt`, for `ckpt_path=`) is written, `trainer.should_stop` ends the fit, and the
usual end-of-training exports write the final files; end-of-run evaluations are skipped (they take minutes,
and `evaluate.py` runs them on the files). A second Ctrl-C stops at once; the files of the last completed
export and the newest checkpoint stay as they were, and the resume line still names that checkpoint.

Slow work that a stop may give up (an evaluation, a preview) runs inside `stoppable`: a signal there raises
`Stopped` at once, so a stop during the end-of-run evaluation takes seconds, not the evaluation's minutes.
"""

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def interrupted(trainer) -> bool:
    """Whether a GracefulStop of this trainer received Ctrl-C or SIGTERM (callbacks skip slow end-of-run work)."""
    return any(isinstance(c, GracefulStop) and c.received is not None for c in trainer.callbacks)


class Stopped(Exception):
    """Ctrl-C or SIGTERM arrived inside `stoppable`: the work there is given up; the run saves and stops."""


@contextmanager
def stoppable(trainer, what: str) -> Iterator[None]:
    """Run slow work (`what`: "toy evaluation", "preview") that Ctrl-C or SIGTERM may cut short: inside, a signal
    raises `Stopped` at once (one received earlier raises on entry). Only for work one process does alone: a
    rank leaving a collective early would leave the others waiting."""
    stop = next((c for c in trainer.callbacks if isinstance(c, GracefulStop)), None)
    if stop is None:
        yield
        return
    try:
        stop.cutting = what  # inside the try: a signal right after this line still resets it
        if stop.received is not None:
            raise Stopped(stop.received.name)
        yield
    finally:
        stop.cutting = None


class GracefulStop(L.Callback):
    """Args:
    dirpath: where the interrupt checkpoint goes when the trainer has no ModelCheckpoint.
    """

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)
        self.received: signal.Signals | None = None
        self.checkpoint: Path | None = None
        self.previous: dict[int, object] = {}
        self.step_at_start = 0
        self.cutting: str | None = None  # the slow work a signal gives up (see `stoppable`)

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:  # asked twice: stop now
            self._restore()
            raise KeyboardInterrupt
        self.received = signal.Signals(signum)
        if self.cutting is not None:
            rank_zero_info(f"\n[lit_ti] {self.received.name}: giving up the {self.cutting}, then stopping")
            raise Stopped(self.received.name)
        rank_zero_info(f"\n[lit_ti] {self.received.name}: finishing this step, then saving and stopping")

    def _restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}

    def on_train_start(self, trainer, pl_module) -> None:
        # after Lightning installed its own SIGTERM handler (which would stop without saving), so ours wins
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.getsignal(s) for s in SIGNALS}
            for s in SIGNALS:
                signal.signal(s, self._handle)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.step_at_start = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step_at_start or trainer.should_stop:
            return  # mid gradient accumulation: a checkpoint must sit on a step boundary
        received = self.received is not None
        if trainer.world_size > 1:
            # every rank must stop at the same step (and all take part in the checkpoint), even when the
            # signal reached only some of them, or reached them a step apart
            received = trainer.strategy.reduce_boolean_decision(received, all=False)
            if received and self.received is None:
                self.received = signal.SIGTERM
        if not received:
            return
        folder = Path(trainer.checkpoint_callback.dirpath) if trainer.checkpoint_callback else self.dirpath
        self.checkpoint = folder / "last.ckpt"
        trainer.save_checkpoint(self.checkpoint, weights_only=False)  # the full state: it resumes
        trainer.should_stop = True

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._restore()
