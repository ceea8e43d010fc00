"""Console progress of a training run, from rank 0 only.

At start one line gives the planned number of optimizer steps and how it was derived. On a terminal a rich bar shows
the step, the per-term losses and the time remaining; off a terminal (nohup, SLURM, CI, a pipe) a plain line is
printed and flushed at the first step, every ``run.log_every`` steps and at the last. The losses shown are the
window-normalised terms the step optimises (each term averaged over the step's capabilities), never their sum.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from typing import Any, TextIO

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn


def planned_steps(
    total: int,
    *,
    max_steps: int | None,
    epochs: float,
    micro_steps_per_epoch: int,
    samples: int,
    micro_batch: int,
    grad_accum: int,
    world: int,
    per_capability: bool = False,
) -> str:
    """The start line: ``total`` optimizer steps and where the number comes from."""
    if max_steps:
        return f"planned {total} optimizer steps (optim.max_steps)"
    pool = "samples of the largest capability" if per_capability else "samples"
    return (
        f"planned {total} optimizer steps = {epochs:g} epochs x {micro_steps_per_epoch} micro-steps per epoch "
        f"(ceil({samples} {pool} / (micro_batch {micro_batch} x world {world}))) / grad_accum {grad_accum}"
    )


def term_losses(record: dict[str, Any]) -> dict[str, float]:
    """Each term's window-normalised value (``loss/<term>/<capability>`` keys), averaged over capabilities."""
    values: dict[str, list[float]] = defaultdict(list)
    for key, value in record.items():
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == "loss":
            values[parts[1]].append(float(value))
    return {name: sum(v) / len(v) for name, v in values.items()}


def duration(seconds: float) -> str:
    """``seconds`` as 41s, 3m41s or 2h05m."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def step_line(record: dict[str, Any], total: int, seconds_per_step: float, eta_seconds: float) -> str:
    """``step 20/200  ce 1.234  attn 0.0123  lr 4.90e-05  1.23 s/step  ETA 3m41s``."""
    losses = "  ".join(f"{name} {value:.4g}" for name, value in term_losses(record).items())
    skipped = "  skipped (non-finite)" if record.get("skipped_nonfinite") else ""
    return (
        f"step {record['step']}/{total}  {losses}  lr {record['lr']:.2e}  {seconds_per_step:.2f} s/step  "
        f"ETA {duration(eta_seconds)}{skipped}"
    )


class TrainProgress:
    """The run's console progress; a silent no-op on ranks other than 0."""

    def __init__(
        self, total: int, start: int, log_every: int, rank: int, stream: TextIO | None = None
    ) -> None:
        self.total, self.start, self.log_every = total, start, log_every
        self.stream = stream or sys.stdout
        self.active = rank == 0
        self.tty = self.active and self.stream.isatty()
        self.seconds = 0.0  # step time of this run so far
        self.since = (0.0, 0)  # step time and steps since the last plain line
        self.bar: Progress | None = None
        self.task: Any = None

    def __enter__(self) -> TrainProgress:
        if self.tty:
            self.bar = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total} steps"),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
                console=Console(file=self.stream),
                transient=True,
            )
            self.bar.__enter__()
            self.task = self.bar.add_task("train", total=self.total, completed=self.start, info="")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def say(self, line: str) -> None:
        """A line from rank 0 (above the bar on a terminal), flushed."""
        if not self.active:
            return
        if self.bar is not None:
            self.bar.console.print(line, markup=False, highlight=False)
        else:
            print(line, file=self.stream, flush=True)

    def update(self, record: dict[str, Any]) -> None:
        """After each optimizer step (``record`` from :meth:`Trainer.train_step`)."""
        if not self.active:
            return
        step, seconds = record["step"], record["seconds"]
        self.seconds += seconds
        mean = self.seconds / (step - self.start)
        eta = mean * (self.total - step)
        if self.bar is not None:
            info = "  ".join(f"{n} {v:.4g}" for n, v in term_losses(record).items())
            self.bar.update(self.task, completed=step, info=f"{info}  lr {record['lr']:.2e}")
            return
        interval, count = self.since[0] + seconds, self.since[1] + 1
        self.since = (interval, count)
        if step == self.start + 1 or step % self.log_every == 0 or step == self.total:
            self.say(step_line(record, self.total, interval / count, eta))
            self.since = (0.0, 0)
