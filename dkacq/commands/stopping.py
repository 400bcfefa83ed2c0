"""Stopping on a scheduler's signal: SIGTERM (preemption, ``scancel``, the end of a time limit) and SIGUSR1
(what SLURM sends before a time limit when a job asks for it with ``--signal=SIGUSR1@<seconds>``).

While a command runs (:func:`handling`), either signal stops it at the end of the batch in progress, or
at once between batches (as Ctrl+C would): a probe cell's row, the cache's batches and the attribution's
counted texts are saved per batch, and dkacq's writes are atomic, so what was done is kept. The command
then prints one line on stderr, what is saved and how to resume, and exits with 128 + the signal's
number (143 for SIGTERM, 138 for SIGUSR1), never 0: a scheduler or a ``&&`` chain sees that it did not
finish. Run again, the same command resumes (probe cells with a row of the same identity are skipped,
the cache and attribution continue from their saved batches) and ends with the numbers of an
uninterrupted run.

Lightning's own handling is kept and built on: its SIGTERM handler (``trainer.received_sigterm``, which
its fit and evaluation loops turn into ``SIGTERMException``) runs before dkacq's, and the exception that
stops a command is a ``SIGTERMException``, so a user's ``on_exception`` callbacks see the usual one. What
dkacq adds: the predict loops (cache build, attribution) stop too, SIGUSR1 stops every command, and the
exit status is not 0. On SLURM, SIGUSR1 requeues the job when the trainer's ``SLURMEnvironment`` has
``auto_requeue`` (Lightning's default there; ``--trainer.plugins`` can turn it off), with the
``scontrol requeue`` call Lightning makes; Lightning's ``hpc_ckpt_<n>.ckpt`` is not written, because a
dkacq job runs many trainers: that checkpoint would land in the working folder, be restored into
whichever probe cell fits first after the requeue, and for the cache and attribution hold the whole
encoder. dkacq's own progress files are what a requeued job resumes from.
"""

import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.fabric.utilities.rank_zero import _get_rank
from lightning.pytorch import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
log = logging.getLogger("dkacq")


class Stopped(SIGTERMException):
    """The command was stopped by ``signum``; its exit status is 128 + ``signum``."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum


class StopState:
    """The signal received (if any) and what the running command has saved, for its last line."""

    def __init__(self):
        self.signum: int | None = None
        self.raised = False
        self.in_batch = False
        self.requeue: bool | None = None
        """Whether SIGUSR1 requeues the job: the trainer's ``SLURMEnvironment`` with ``auto_requeue``
        (None until a trainer has run: then whether the process runs under SLURM's ``srun``)."""
        self.saved: Callable[[], str] = lambda: "it had not started any work"
        self.resume = "run the same command again"

    def handle(self, signum: int, frame) -> None:
        """The signal handler: remember the signal; stop now unless a batch is in progress."""
        if self.signum is None:
            self.signum = signum
        if not self.in_batch:
            self.stop()

    def stop(self) -> None:
        """Raise :class:`Stopped` once, if a signal was received."""
        if self.signum is not None and not self.raised:
            self.raised = True
            raise Stopped(self.signum)

    def doing(self, saved: Callable[[], str], resume: str = "run the same command again") -> None:
        """What the command saves from here on: ``saved()`` says it when the command is stopped."""
        self.saved, self.resume = saved, resume

    def line(self) -> str:
        name = signal.Signals(self.signum).name
        try:
            saved = self.saved()
        except Exception as error:  # the line must be printed whatever the state of the files
            saved = f"what is saved could not be read ({error})"
        line = f"dkacq: stopped by {name}: {saved}; {self.resume} to resume"
        if self.signum == signal.SIGUSR1 and self.wants_requeue():
            line += f"; {requeue()}"
        return line

    def wants_requeue(self) -> bool:
        return self.requeue if self.requeue is not None else SLURMEnvironment.detect()


STATE = StopState()


class StopAtBatchEnd(Callback):
    """Defers a signal received during a batch to the end of that batch (after the other callbacks
    have saved it), and reads the trainer's cluster environment for the requeue. Every trainer of a
    command gets one, last among its callbacks."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        environment = trainer._accelerator_connector.cluster_environment
        STATE.requeue = isinstance(environment, SLURMEnvironment) and environment.auto_requeue

    def _start(self, *args, **kwargs) -> None:
        STATE.in_batch = True

    def _end(self, *args, **kwargs) -> None:
        STATE.in_batch = False
        STATE.stop()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        STATE.in_batch = False

    on_train_batch_start = on_validation_batch_start = on_test_batch_start = on_predict_batch_start = _start
    on_train_batch_end = on_validation_batch_end = on_test_batch_end = on_predict_batch_end = _end


def requeue() -> str:
    """Requeue this SLURM job as Lightning's auto-requeue does (``scontrol requeue <job id>``, the array
    task's id for an array job); what happened, for the stop line."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ.get("SLURM_JOB_ID")
    if not job:
        return "not requeued: SLURM_JOB_ID is not set"
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True).returncode
    except OSError as error:
        return f"requeueing SLURM job {job} failed ({error})"
    return f"SLURM job {job} requeued" if result == 0 else f"requeueing SLURM job {job} failed (scontrol: {result})"


@contextmanager
def handling() -> Iterator[StopState]:
    """Run a command under dkacq's handlers of :data:`SIGNALS`; a stop prints its one line (global rank 0)
    and exits with 128 + the signal's number. The previous handlers are restored at the end."""
    global STATE
    STATE = StopState()
    previous = {signum: signal.getsignal(signum) for signum in SIGNALS}
    for signum in SIGNALS:
        signal.signal(signum, STATE.handle)
    try:
        yield STATE
    except SystemExit as exit:  # Stopped, or Lightning's own SIGTERMException
        if STATE.signum is None or (exit.code not in (None, 0) and not isinstance(exit, Stopped)):
            raise
        code = 128 + STATE.signum
        if (_get_rank() or 0) == 0:
            sys.stdout.flush()
            print(STATE.line(), file=sys.stderr, flush=True)
        raise SystemExit(code) from None
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
