"""Generation in a worker thread behind a one-slot mailbox, so the display loop never waits on the model.

The loop posts a job each tick; the worker takes the newest one when it is free. A step posted while
another is still waiting is merged into it (newest keys, summed mouse motion), so a slow model gets
fresh input instead of a queue of stale input. Each frame's KV-cache write is folded into the next
step's first forward (``Session``), so the worker does nothing while it waits. torch releases the GIL
in its kernels, so the loop keeps sampling input and presenting while a frame is generated.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass

from play.generator import FrameGenerator, Generated
from play.input import InputSample, merge_samples


@dataclass(frozen=True)
class StepJob:
    sample: InputSample


@dataclass(frozen=True)
class ResetJob:
    seed: int
    start: object = None  # image path, uint8 [H, W, 3] or None


@dataclass(frozen=True)
class StopJob:
    pass


@dataclass
class Result:
    generated: Generated
    sample: InputSample | None  # None for resets
    done_at: float  # time.perf_counter() when the frame was ready


class Mailbox:
    """One slot. A reset replaces whatever waits; a step merges into a waiting step (``merge=True``),
    is refused while a reset waits (returns False), and otherwise fills the empty slot."""

    def __init__(self):
        self._cond = threading.Condition()
        self._job = None
        self.merged = 0  # steps merged into a waiting one since the start

    def put(self, job, merge: bool = True) -> str | None:
        """Returns "placed" (the slot was empty), "merged" (into a waiting step), "replaced", or None (refused)."""
        with self._cond:
            waiting = self._job
            if isinstance(waiting, StopJob):
                return None
            status = "placed" if waiting is None else "replaced"
            if isinstance(job, StepJob) and isinstance(waiting, StepJob):
                if not merge:
                    return None
                job = StepJob(merge_samples(waiting.sample, job.sample))
                self.merged += 1
                status = "merged"
            elif isinstance(job, StepJob) and waiting is not None:
                return None
            self._job = job
            self._cond.notify()
            return status

    def take(self, timeout: float | None = None):
        with self._cond:
            if self._job is None:
                self._cond.wait(timeout)
            job, self._job = self._job, None
            return job

    @property
    def holds_step(self) -> bool:
        """A step waits in the slot (live input can still be merged into it)."""
        with self._cond:
            return isinstance(self._job, StepJob)

    @property
    def empty(self) -> bool:
        with self._cond:
            return self._job is None


class GenerationWorker:
    """Runs a :class:`FrameGenerator` in a daemon thread. ``steps`` may be set from the loop at any time;
    it applies from the next job. An exception in the thread is kept in ``error`` and ends the thread."""

    def __init__(self, generator: FrameGenerator):
        self.generator = generator
        self.mailbox = Mailbox()
        self.steps = generator.steps
        self.error: BaseException | None = None
        self.busy = False
        self._results: queue.SimpleQueue[Result] = queue.SimpleQueue()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="generation", daemon=True)

    def start(self) -> "GenerationWorker":
        self._thread.start()
        return self

    def submit(self, job, merge: bool = True) -> str | None:
        """Post ``job`` (see :meth:`Mailbox.put`)."""
        return self.mailbox.put(job, merge)

    @property
    def idle(self) -> bool:
        """Nothing waiting and nothing being generated."""
        return not self.busy and self.mailbox.empty

    def wait(self, timeout: float) -> None:
        """Sleep until a frame is finished or ``timeout`` seconds passed, whichever is first."""
        self._ready.wait(timeout)

    def results(self) -> list[Result]:
        """Every frame finished since the last call, oldest first."""
        self._ready.clear()
        out = []
        while True:
            try:
                out.append(self._results.get_nowait())
            except queue.Empty:
                return out

    def stop(self, timeout: float = 10.0) -> None:
        self.mailbox.put(StopJob())
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            job = self.mailbox.take(timeout=0.1)
            if job is None:
                continue
            if isinstance(job, StopJob):
                return
            self.busy = True
            try:
                self.generator.set_steps(self.steps)
                if isinstance(job, ResetJob):
                    generated, sample = self.generator.reset(job.seed, job.start), None
                else:
                    generated, sample = self.generator.step(job.sample.action), job.sample
                self._results.put(Result(generated, sample, time.perf_counter()))
                self._ready.set()
            except BaseException as e:  # handed to the display loop, which reports it
                self.error = e
                self._ready.set()
                return
            finally:
                self.busy = False
