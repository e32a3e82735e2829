"""Progress of a search as the user sees it: the `Reporter` protocol the search calls, a silent one for library
use and other ranks, and the rich console one of the CLI (a live bar plus one line per generation).
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

if TYPE_CHECKING:  # types only: the CLI imports this module before any command, so it stays free of torch
    from longrope_search.checkpoint import SearchState
    from longrope_search.search_setup import SearchSetup


# Without a terminal (a log file, a scheduler's output) the live bar is not drawn: a plain line says where the work
# is at least this often, so a log never stays silent for a whole generation.
PLAIN_EVERY_SECONDS = 60.0
# ... and a phase (loading, tokenising, comparing) gets its line once it has lasted this long: a quick command, or
# one refused for a bad input, prints nothing but its result or its one-line error.
PLAIN_DELAY_SECONDS = 10.0


def clock(seconds: float) -> str:
    """3725 -> '1:02:05', 65 -> '1:05'."""
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Countdown:
    """Units of like work counted for a phase line: `next()` before each unit gives "3 of 42, about 1:10 left" (the
    time left from the units finished so far)."""

    def __init__(self, total: int) -> None:
        self.total, self.started, self.finished = total, time.monotonic(), 0

    def next(self) -> str:
        elapsed = time.monotonic() - self.started
        left = (f", about {clock(elapsed / self.finished * (self.total - self.finished))} left"
                if self.finished else "")
        self.finished += 1
        return f"{self.finished} of {self.total}{left}"


class PlainPhases:
    """Phases as plain lines (no terminal): the current phase is printed, with the time since `start`, once it has
    lasted `delay` seconds and then every `every` seconds while it lasts (from a daemon thread)."""

    def __init__(self, out: Console, start: float, delay: float = PLAIN_DELAY_SECONDS,
                 every: float = PLAIN_EVERY_SECONDS) -> None:
        self.out, self.start, self.delay, self.every = out, start, delay, every
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.message: str | None = None
        self.since = self.printed = 0.0
        self.thread: threading.Thread | None = None

    def set(self, message: str | None) -> None:
        """The phase now running (None: none; a bar or a result takes over)."""
        with self.lock:
            self.message, self.since, self.printed = message, time.monotonic(), -math.inf
        if message is not None and self.delay <= 0:
            self._print_due()
        elif message is not None and self.thread is None:
            self.thread = threading.Thread(target=self._watch, name="longrope-phases", daemon=True)
            self.thread.start()

    def _print_due(self) -> None:
        with self.lock:
            now = time.monotonic()
            if self.message is None or now - self.since < self.delay or now - self.printed < self.every:
                return
            self.printed = now
            line = f"[{clock(now - self.start)}] {self.message}"
        self.out.print(line, markup=False, highlight=False)

    def _watch(self) -> None:
        while not self.done.wait(0.5):
            self._print_due()

    def close(self) -> None:
        self.done.set()


@contextlib.contextmanager
def phases(out: Console, delay: float = PLAIN_DELAY_SECONDS) -> Iterator[Callable[[str], None]]:
    """A callable that shows what a command is doing: a status line with a spinner and the elapsed time on a
    terminal (replaced by the next phase, gone at the end); elsewhere a plain timestamped line for each phase that
    lasts `delay` seconds or more (`PlainPhases`)."""
    start = time.monotonic()
    if not out.is_terminal:
        plain = PlainPhases(out, start, delay)
        try:
            yield plain.set
        finally:
            plain.close()
        return
    with out.status("starting") as status:
        yield lambda line: status.update(f"{line} [dim](started at {clock(time.monotonic() - start)})[/dim]")


class Reporter(Protocol):
    def warn(self, message: str) -> None: ...

    def note(self, message: str) -> None: ...

    def phase(self, message: str) -> None: ...

    def start(self, setup: SearchSetup, state: SearchState | None) -> None: ...

    def evaluated(self, ppl: float, cached: bool) -> None: ...

    def generation(self, state: SearchState) -> None: ...

    def train_start(self, steps: int, done: int, what: str) -> None: ...

    def trained(self, step: int, logs: dict[str, float]) -> None: ...

    def stop(self) -> None: ...


class NullReporter:
    """Reports nothing: library calls, and every rank but rank 0 under torchrun."""

    def warn(self, message: str) -> None:
        pass

    def note(self, message: str) -> None:
        pass

    def phase(self, message: str) -> None:
        pass

    def start(self, setup: Any, state: Any) -> None:
        pass

    def evaluated(self, ppl: float, cached: bool) -> None:
        pass

    def generation(self, state: Any) -> None:
        pass

    def train_start(self, steps: int, done: int, what: str) -> None:
        pass

    def trained(self, step: int, logs: dict[str, float]) -> None:
        pass

    def stop(self) -> None:
        pass


SILENT = NullReporter()


class RichReporter:
    """Live progress of a search: a status line per phase (loading, tokenising, the final comparison), a bar over
    evaluations naming the running generation, and one printed line per generation. Without a terminal the bar
    becomes a plain line every PLAIN_EVERY_SECONDS."""

    def __init__(self, out: Console, every: float = PLAIN_EVERY_SECONDS, delay: float = PLAIN_DELAY_SECONDS) -> None:
        self.console = out
        self.progress: Progress | None = None
        self.task: Any = None
        self.status: Any = None
        self.every = every
        self.started = time.monotonic()
        self.plain = PlainPhases(out, self.started, delay, every)
        self.generations = 0  # N of "generation g of N"
        self.running = 0  # the generation being scored
        self.total = self.done = self.first = 0  # evaluations: the budget, finished, finished before this start
        self.last_line = 0.0  # when the last plain progress line was printed
        self.every_step = 1  # a fine-tune prints a line every this many steps

    @property
    def live(self) -> bool:
        return self.console.is_terminal

    def warn(self, message: str) -> None:
        self.console.print(f"warning: {message}", markup=False, style="yellow")

    def note(self, message: str) -> None:
        self.console.print(message, markup=False)

    def phase(self, message: str) -> None:
        """What the search does now, until the next phase or the bar: a spinner on a terminal, else one line."""
        elapsed = clock(time.monotonic() - self.started)
        if not self.live:
            self.plain.set(message)
            return
        if self.progress is not None:  # after the loop (the final comparison): the bar gives way to the status
            self.progress.stop()
            self.progress = None
        if self.status is None:
            self.status = self.console.status(message)
            self.status.start()
        self.status.update(f"{message} [dim](at {elapsed})[/dim]")

    def _end_status(self) -> None:
        self.plain.set(None)
        if self.status is not None:
            self.status.stop()
            self.status = None

    def _description(self) -> str:
        return f"generation {self.running} of {self.generations}"

    def start(self, setup: SearchSetup, state: SearchState | None) -> None:
        self.stop()  # the previous stage's bar, when stages run one after another
        s = setup.config.search
        self.total = s.population + s.generations * (s.mutations + s.crossovers)
        self.done = self.first = len(state.history) if state is not None else 0
        self.generations = s.generations
        self.running = state.generation + 1 if state is not None else 0
        self.last_line = time.monotonic()
        space = setup.space
        searched = (f"{space.num_factors} factors from pair {setup.critical_dim} on (critical dimension; the "
                    f"{setup.critical_dim} below follow an NTK curve)" if setup.critical_dim is not None
                    else f"{space.num_factors} factors")
        mscale = (f"mscale searched in [{space.mscale_choices[0]:g}, {space.mscale_choices[-1]:g}]"
                  if space.mscale_choices else f"mscale {setup.mscale:.4f}")
        self.console.print(
            f"searching {searched} for {setup.target_length} tokens ({setup.scale:g}x the "
            f"{setup.spec.original_length}-token window), {mscale}, n_hat in {list(space.n_hat_choices)}, fitness "
            f"{setup.config.search.fitness}; generation 0 is the initial population, then {s.generations} more"
            + (f"; resuming after generation {state.generation}" if state is not None else ""),
            markup=False,
        )
        if not self.live:
            return
        self.progress = self._bar("evals")
        self.task = self.progress.add_task(self._description(), total=self.total, completed=self.done)
        self.progress.start()

    def evaluated(self, ppl: float, cached: bool) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress.advance(self.task)
            return
        now = time.monotonic()
        if now - self.last_line >= self.every:
            self.last_line = now
            elapsed = now - self.started
            fresh = self.done - self.first
            left = (f", about {clock(elapsed / fresh * (self.total - self.done))} left"
                    if fresh and self.total > self.done else "")
            self.console.print(f"{self._description()}: {self.done} of {self.total} evaluations, "
                               f"{clock(elapsed)} elapsed{left}", markup=False, highlight=False)

    def generation(self, state: SearchState) -> None:
        best = state.best()
        per_eval = state.seconds / max(len(state.history), 1)  # scoring time only, resumed runs included
        rejected = sum(e.rejected for e in state.history)
        validated = state.validation[-1] if state.validation and state.validation[-1][0] == state.generation else None
        line = (f"generation {state.generation} of {self.generations}: best {best.ppl:.4f} ({best.origin})"
                + (f", validation {validated[2]:.4f}" if validated else "")
                + f", {len(state.history)} evaluations" + (f" ({rejected} stopped early)" if rejected else "")
                + f", {state.forward_tokens / 1e6:.2f}M forward tokens, {per_eval:.2f} s/eval")
        self.running = state.generation + 1
        if self.progress is not None:
            self.progress.update(self.task, description=f"{self._description()}, best {best.ppl:.3f}")
            self.progress.console.print(line, markup=False)
        else:
            self.console.print(line, markup=False)

    def train_start(self, steps: int, done: int, what: str) -> None:
        """A fine-tune's bar over optimizer steps (`done` of them finished before a resume), and its opening line."""
        self.stop()
        self.console.print(what, markup=False)
        self.total, self.done = steps, done
        self.first, self.running = done, done
        self.began = time.monotonic()  # the training's own clock: tokens/s and the time left leave the loading out
        self.every_step = max(1, steps // 20)  # about 20 printed lines per fine-tune
        self.last_line = time.monotonic()
        if not self.live:
            return
        self.progress = self._bar("steps")
        self.task = self.progress.add_task("fine-tuning", total=steps, completed=done)
        self.progress.start()

    def trained(self, step: int, logs: dict[str, float]) -> None:
        """One optimizer step done (`logs`: the Trainer's, with "tokens" trained so far): the bar moves with the loss
        and tokens/s; a line every ~5% of the steps (and the last)."""
        self.done = step
        loss = logs.get("loss", math.nan)
        fresh, training = step - self.first, time.monotonic() - self.began  # this process's steps, its training time
        rate = f", {logs['tokens'] / step * fresh / training:,.0f} tokens/s" if "tokens" in logs and fresh and training else ""
        if self.progress is not None:
            self.progress.update(self.task, completed=step, description=f"fine-tuning, loss {loss:.4f}{rate}")
        if step % self.every_step and step != self.total:
            return
        left = f", about {clock(training / fresh * (self.total - step))} left" if fresh and step < self.total else ""
        line = (f"step {step} of {self.total}: loss {loss:.4f}, learning rate {logs.get('learning_rate', math.nan):.3g}"
                f"{rate}, {clock(time.monotonic() - self.started)} elapsed{left}")
        (self.progress.console if self.progress is not None else self.console).print(line, markup=False,
                                                                                     highlight=False)

    def _bar(self, unit: str) -> Progress:
        """The live bar: what runs, done of total `unit`, elapsed and remaining; gone from the screen when stopped."""
        return Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn(unit),
            TimeElapsedColumn(), TextColumn("elapsed,"), TimeRemainingColumn(), TextColumn("left"),
            console=self.console, transient=True,
        )

    def stop(self) -> None:
        """The bar and the status gone (a next stage's `start` brings them back)."""
        self._end_status()
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
