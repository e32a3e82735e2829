"""Progress of a search as the user sees it: the `Reporter` protocol the search calls, a silent one for library
use and other ranks, and the rich console one of the CLI (a live bar plus one line per generation).
"""

from __future__ import annotations

from typing import Any, Protocol

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from longrope_search.checkpoint import SearchState
from longrope_search.search_setup import SearchSetup


class Reporter(Protocol):
    def warn(self, message: str) -> None: ...

    def note(self, message: str) -> None: ...

    def start(self, setup: SearchSetup, state: SearchState | None) -> None: ...

    def evaluated(self, ppl: float, cached: bool) -> None: ...

    def generation(self, state: SearchState) -> None: ...

    def stop(self) -> None: ...


class NullReporter:
    """Reports nothing: library calls, and every rank but rank 0 under torchrun."""

    def warn(self, message: str) -> None:
        pass

    def note(self, message: str) -> None:
        pass

    def start(self, setup: Any, state: Any) -> None:
        pass

    def evaluated(self, ppl: float, cached: bool) -> None:
        pass

    def generation(self, state: Any) -> None:
        pass

    def stop(self) -> None:
        pass


SILENT = NullReporter()


class RichReporter:
    """Live progress of a search: a bar over evaluations plus one printed line per generation."""

    def __init__(self, out: Console) -> None:
        self.console = out
        self.progress: Progress | None = None
        self.task: Any = None

    def warn(self, message: str) -> None:
        self.console.print(f"warning: {message}", markup=False, style="yellow")

    def note(self, message: str) -> None:
        self.console.print(message, markup=False)

    def start(self, setup: SearchSetup, state: SearchState | None) -> None:
        self.stop()  # the previous stage's bar, when stages run one after another
        s = setup.config.search
        total = s.population + s.generations * (s.mutations + s.crossovers)
        done = len(state.history) if state is not None else 0
        space = setup.space
        searched = (f"{space.num_factors} factors from pair {setup.critical_dim} on (critical dimension; the "
                    f"{setup.critical_dim} below follow an NTK curve)" if setup.critical_dim is not None
                    else f"{space.num_factors} factors")
        mscale = (f"mscale searched in [{space.mscale_choices[0]:g}, {space.mscale_choices[-1]:g}]"
                  if space.mscale_choices else f"mscale {setup.mscale:.4f}")
        self.console.print(
            f"searching {searched} for {setup.target_length} tokens ({setup.scale:g}x the "
            f"{setup.spec.original_length}-token window), {mscale}, n_hat in {list(space.n_hat_choices)}, fitness "
            f"{setup.config.search.fitness}" + (f"; resuming after generation {state.generation}" if state is not None else ""),
            markup=False,
        )
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("evals"),
            TimeRemainingColumn(), console=self.console, transient=True,
        )
        self.task = self.progress.add_task("generation 0", total=total, completed=done)
        self.progress.start()

    def evaluated(self, ppl: float, cached: bool) -> None:
        if self.progress is not None:
            self.progress.advance(self.task)

    def generation(self, state: SearchState) -> None:
        best = state.best()
        per_eval = state.seconds / max(len(state.history), 1)  # scoring time only, resumed runs included
        rejected = sum(e.rejected for e in state.history)
        validated = state.validation[-1] if state.validation and state.validation[-1][0] == state.generation else None
        line = (f"generation {state.generation}: best {best.ppl:.4f} ({best.origin})"
                + (f", validation {validated[2]:.4f}" if validated else "")
                + f", {len(state.history)} evaluations" + (f" ({rejected} stopped early)" if rejected else "")
                + f", {state.forward_tokens / 1e6:.2f}M forward tokens, {per_eval:.2f} s/eval")
        if self.progress is not None:
            self.progress.update(self.task, description=f"generation {state.generation}, best {best.ppl:.3f}")
            self.progress.console.print(line, markup=False)
        else:
            self.console.print(line, markup=False)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
