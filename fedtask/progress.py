"""What a user sees while long work runs, and what the run's log keeps.

- :func:`log` is every progress message: to the terminal (stderr) unless ``--quiet``, and to
  every log file open (a run's ``run.log``), always.
- :class:`Progress` is long work with a known size (rounds, samples embedded, runs of a study,
  budgets of a sweep): a tqdm bar with time left when stderr is a terminal; otherwise (CI,
  ``nohup``, a pipe) a plain line now and then (every ``every`` steps, and at least every
  ``interval`` seconds), so that a log stays readable; nothing with ``--quiet``.
- :func:`training_hook` is the per-round hook of ``pipeline.run_training``: every round's line
  to ``run.log`` in the run directory, TensorBoard scalars when ``federation.tensorboard`` is on,
  then the caller's hook, by default (:data:`DEFAULT`) the training bar.

One switch, :func:`set_quiet`, set once by ``run.py`` from ``--quiet``: errors and the final
tables are printed by their callers to stderr/stdout directly and are never silenced here.
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Callable, TextIO

from fedtask.config import ConfigError

LOG_NAME = "run.log"  # in the run directory: every message of the run, every round
TENSORBOARD_DIR = "tensorboard"  # in the run directory, with federation.tensorboard = true
TENSORBOARD_INSTALL = 'pip install "tensorboard>=2.14"  (or: pip install -e ".[tensorboard]")'

_quiet = False
_logs: dict[str, TextIO] = {}  # role -> open log file; every message goes to each
_bars: list["Progress"] = []  # open bars and line reporters, innermost last
_redirect: list[TextIO] = []  # a stream that takes the terminal's place (a study run's own log)
_writers: list["TensorBoardHook"] = []  # open TensorBoard writers


def set_quiet(quiet: bool) -> None:
    """``--quiet``: no progress on the terminal (log files still get everything)."""
    global _quiet
    _quiet = bool(quiet)


def is_quiet() -> bool:
    return _quiet and not _redirect


def _terminal() -> TextIO:
    return _redirect[-1] if _redirect else sys.stderr


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed, or not a file
        return False


# --- messages ---------------------------------------------------------------------------------

def log(message: str, *, terminal: bool = True, files: bool = True) -> None:
    """A progress message: to every open log file, and to the terminal unless quiet."""
    if files:
        _to_files(message)
    if terminal and not is_quiet():
        _print(message)


def error(message: str) -> None:
    """A message the user must see even with ``--quiet`` (it still goes to the log files)."""
    _to_files(message)
    _print(message)


def _print(message: str) -> None:
    stream = _terminal()
    live = [p for p in _bars if p._bar is not None and p.stream is stream]
    if live:
        from tqdm import tqdm

        tqdm.write(message, file=stream)  # above the bar, which is redrawn below
    else:
        print(message, file=stream, flush=True)


def _to_files(message: str) -> None:
    if not _logs:
        return
    stamp = datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    for role, handle in list(_logs.items()):
        try:
            for line in str(message).splitlines() or [""]:
                handle.write(f"{stamp} {line}\n")
            handle.flush()
        except (OSError, ValueError):  # the disk is full, the file was closed: progress is no reason to fail
            _logs.pop(role, None)


def open_log(path: Path, role: str = "run") -> None:
    """Append every message from now on to ``path`` (replacing the log of the same role)."""
    close_log(role)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _logs[role] = open(path, "a", encoding="utf-8")


def close_log(role: str = "run") -> None:
    handle = _logs.pop(role, None)
    if handle is not None:
        with contextlib.suppress(OSError):
            handle.close()


@contextlib.contextmanager
def redirected(stream: TextIO):
    """Progress goes to ``stream`` instead of the terminal, as lines, whatever ``--quiet`` says
    (a study writes each run's progress to that run's own log file); log files opened inside
    are closed at the end, and those open before get nothing meanwhile."""
    saved = dict(_logs)
    _logs.clear()
    _redirect.append(stream)
    try:
        yield stream
    finally:
        _redirect.remove(stream)
        for role in list(_logs):
            close_log(role)
        _logs.update(saved)


def close_all() -> None:
    """End every bar (so that an error is printed on a line of its own) and close the log files."""
    for bar in list(reversed(_bars)):
        bar.close()
    for writer in list(_writers):
        writer.close()
    for role in list(_logs):
        close_log(role)


# --- long work of known size ------------------------------------------------------------------

def duration(seconds: float) -> str:
    """45 s, 3 min 05 s, 2 h 04 min."""
    if not math.isfinite(seconds):
        return "?"
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class Progress:
    """Work of ``total`` steps: a bar on a terminal, plain lines elsewhere, nothing when quiet.

    ``update(done, line=..., postfix=...)``: ``done`` steps are finished; on a terminal the bar
    moves and shows ``postfix``; elsewhere ``line`` (default: ``desc: done/total unit``) is printed,
    with the time spent and left, at the first update, every ``every`` steps (``None``: never by
    count), whenever ``interval`` seconds passed since the last line, and at the end if any line
    was printed before. The work is closed when ``done`` reaches ``total``; its bar stays on
    screen unless ``leave`` is false (default: unless it is drawn below another bar).
    """

    def __init__(self, total: int, desc: str, *, unit: str = "step", initial: int = 0, every: int | None = 1,
                 interval: float = 30.0, leave: bool | None = None):
        self.total, self.desc, self.unit = max(0, int(total)), desc, unit
        self.initial = self.done = max(0, int(initial))
        self.every, self.interval = every, interval
        self.started = time.perf_counter()
        self._last_line_done: int | None = None
        self._last_line_at = self.started
        self._bar = None
        self.closed = False
        self.stream = stream = _terminal()
        if is_quiet():
            self.mode = "off"
        elif _isatty(stream) and not _redirect:
            from tqdm import tqdm

            self.mode = "bar"
            nested = any(p._bar is not None for p in _bars)
            self._bar = tqdm(total=self.total, initial=self.initial, desc=desc, unit=f" {unit}s" if unit else "it",
                             file=stream, dynamic_ncols=True, leave=not nested if leave is None else leave,
                             smoothing=0.1, mininterval=0.2)
        else:
            self.mode = "lines"
        _bars.append(self)

    def seconds_left(self) -> float:
        """From the rate of the steps done since this work started (an earlier run's are not timed)."""
        fresh = self.done - self.initial
        if fresh <= 0:
            return math.nan
        return (time.perf_counter() - self.started) / fresh * max(0, self.total - self.done)

    def timing(self) -> str:
        elapsed = time.perf_counter() - self.started
        if self.done >= self.total:
            return f"{duration(elapsed)}"
        left = self.seconds_left()
        return f"{duration(elapsed)}, about {duration(left)} left" if math.isfinite(left) else duration(elapsed)

    def update(self, done: int | None = None, *, line: str | None = None, postfix: str | None = None) -> None:
        if self.closed:
            return
        self.done = self.done + 1 if done is None else max(0, int(done))
        if self.mode == "bar":
            if postfix is not None:
                self._bar.set_postfix_str(postfix, refresh=False)
            self._bar.update(self.done - self._bar.n)
        elif self.mode == "lines" and self._line_due():
            self._last_line_done, self._last_line_at = self.done, time.perf_counter()
            text = line if line is not None else f"{self.desc}: {self.done:,}/{self.total:,} {self.unit}s"
            print(f"{text} ({self.timing()})", file=self.stream, flush=True)
        if self.done >= self.total:
            self.close()

    def _line_due(self) -> bool:
        if self.done >= self.total:
            return self._last_line_done is not None or self.every is not None
        if self.every is not None and (self._last_line_done is None
                                       or self.done - self._last_line_done >= self.every):
            return True
        return time.perf_counter() - self._last_line_at >= self.interval

    def write(self, message: str) -> None:
        """A message above the bar (any message of :func:`log` is, too)."""
        log(message)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._bar is not None:
            self._bar.close()
        if self in _bars:
            _bars.remove(self)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def counter(desc: str, unit: str = "step", *, interval: float = 30.0) -> Callable[[int, int], None]:
    """A callable ``(done, total)`` for work whose size the worker learns itself (the attack's
    embedding of every task): the bar starts at the first call and ends when done == total.
    Elsewhere than a terminal, a line only when the work takes more than ``interval`` seconds."""
    state: dict = {}

    def advance(done: int, total: int) -> None:
        current = state.get("progress")
        if current is None or current.closed and done < total:
            current = state["progress"] = Progress(total, desc, unit=unit, every=None, interval=interval,
                                                   leave=False)
        current.update(done)

    return advance


# --- training ---------------------------------------------------------------------------------

class _Default:
    """``run_training``'s default ``on_round``: the training bar (or lines), see :func:`training_hook`."""

    def __call__(self, server_round: int, encoder, row: dict) -> None:  # outside run_training: one line
        print_round(server_round, encoder, row)

    def __repr__(self) -> str:
        return "progress.DEFAULT"


DEFAULT = _Default()


def round_line(server_round: int, row: dict, rounds: int | None = None) -> str:
    """One round's full line (the log file's; the terminal's when it is not a terminal)."""
    of = f"/{rounds}" if rounds else ""
    extra = f" |g|={row['aggregate_norm']:.3f}" if "aggregate_norm" in row else ""
    if "clipped_fraction" in row:
        extra += f" clipped={row['clipped_fraction']:.0%}"
    if row.get("failed"):
        extra += f" failed={len(row['failed'])} (tasks {', '.join(map(str, list(row['failed'])[:5]))})"
    return (f"round {server_round:>4}{of} [{row['phase']:<10}] tasks={len(row['tasks']):>4} "
            f"loss={row['loss']:.4f}{extra} {row['seconds']:.2f}s")


def print_round(server_round: int, encoder, row: dict) -> None:
    """A plain per-round hook: one line per round."""
    log(round_line(server_round, row))


class TrainingProgress:
    """The training bar: rounds done of all, the round's loss and update norm, time left."""

    def __init__(self, rounds: int):
        self.rounds = rounds
        self.progress: Progress | None = None

    def __call__(self, server_round: int, encoder, row: dict) -> None:
        if self.progress is None or self.progress.closed:  # built at the first round (a resumed run starts later)
            self.progress = Progress(self.rounds, "training", unit="round", initial=server_round - 1,
                                     every=1 if self.rounds <= 50 else math.ceil(self.rounds / 50))
        postfix = f"loss={row['loss']:.4f}" + (f" |g|={row['aggregate_norm']:.3g}" if "aggregate_norm" in row else "")
        if row["phase"] != "train":
            postfix += f" ({row['phase'].replace('_', ' ')})"
        if row.get("failed"):  # worth a line of its own, above the bar
            if self.progress.mode == "bar":  # (the log file's round line says it already)
                log(f"round {server_round}: {len(row['failed'])} tasks failed "
                    f"({', '.join(map(str, list(row['failed'])[:5]))})", files=False)
            postfix += f" failed={len(row['failed'])}"
        self.progress.update(server_round, line=round_line(server_round, row, self.rounds), postfix=postfix)


def caller_hook(config, on_round=DEFAULT):
    """What ``on_round`` means for a run of ``config``: :data:`DEFAULT` is the training bar (or
    lines), ``None`` nothing, any other callable itself."""
    if on_round is DEFAULT:
        return TrainingProgress(config.federation.rounds)
    return on_round


def training_hook(config, work_dir: Path, on_round=DEFAULT):
    """The per-round hook ``run_training`` trains with: every round's line to ``work_dir/run.log``
    (opened now, so that everything logged from here on goes there too), TensorBoard scalars when
    ``federation.tensorboard`` is on, then ``on_round`` (:func:`caller_hook`)."""
    work_dir = Path(work_dir)
    open_log(work_dir / LOG_NAME)
    rounds = config.federation.rounds
    hooks = []
    if config.federation.tensorboard:
        hooks.append(TensorBoardHook(config, work_dir / TENSORBOARD_DIR))
    caller = caller_hook(config, on_round)
    if caller is not None:
        hooks.append(caller)

    def hook(server_round: int, encoder, row: dict) -> None:
        _to_files(round_line(server_round, row, rounds))
        for each in hooks:
            each(server_round, encoder, row)

    return hook


# --- TensorBoard ------------------------------------------------------------------------------

def check_tensorboard(config) -> None:
    """``federation.tensorboard = true`` needs the tensorboard package: refuse before training."""
    if not config.federation.tensorboard:
        return
    try:
        import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it, and says so only on use)
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise ConfigError("federation.tensorboard: true, but the tensorboard package is not installed; "
                          f"install it with {TENSORBOARD_INSTALL}, or set federation.tensorboard = false") from None


class EpsilonSoFar:
    """The accountant's epsilon after the encoder rounds done so far, cheaply.

    RDP grows linearly with the rounds: one order curve, computed once, scaled per round, gives
    exactly what Opacus's RDP accountant gives. The PRV and PLD accountants are numerical and
    cost up to seconds a call: they are asked at most when it keeps their time under a tenth
    of the training's, and at the last round.
    """

    def __init__(self, config):
        dp = config.dp
        self.z, self.q, self.delta, self.accountant = dp.noise_multiplier, config.sample_rate, dp.delta, dp.accountant
        self.warm, self.last = config.federation.warm_start_rounds, config.encoder_rounds
        self._orders = self._rdp = None
        self._next_at, self._started = 0.0, time.perf_counter()

    def steps(self, server_round: int) -> int:
        return max(0, min(server_round - self.warm, self.last))

    def __call__(self, server_round: int) -> float | None:
        """Epsilon after ``server_round`` rounds, or None when skipped this round (a slow accountant)."""
        steps = self.steps(server_round)
        if steps == 0 or not self.z or math.isinf(self.z):
            from strategies.accounting import epsilon_spent

            return epsilon_spent(noise_multiplier=self.z, sample_rate=self.q, steps=steps, delta=self.delta,
                                 accountant=self.accountant)
        if self.accountant == "rdp":
            from opacus.accountants.analysis import rdp as analysis
            from opacus.accountants.rdp import RDPAccountant

            if self._rdp is None:
                self._orders = RDPAccountant.DEFAULT_ALPHAS
                self._rdp = analysis.compute_rdp(q=self.q, noise_multiplier=self.z, steps=1, orders=self._orders)
            eps, _ = analysis.get_privacy_spent(orders=self._orders, rdp=self._rdp * steps, delta=self.delta)
            return float(eps)
        now = time.perf_counter()
        if now < self._next_at and steps < self.last:
            return None
        from strategies.accounting import epsilon_spent

        eps = epsilon_spent(noise_multiplier=self.z, sample_rate=self.q, steps=steps, delta=self.delta,
                            accountant=self.accountant)
        cost = time.perf_counter() - now
        self._next_at = time.perf_counter() + 9 * cost  # the accountant's share of the time stays under 10 %
        return eps


class TensorBoardHook:
    """Per round: loss, the encoder update's norms, and (DP) the epsilon spent so far, under ``log_dir``."""

    def __init__(self, config, log_dir: Path):
        self.log_dir, self.rounds = Path(log_dir), config.federation.rounds
        self.epsilon = EpsilonSoFar(config) if config.dp.enabled else None
        self.writer = None

    def __call__(self, server_round: int, encoder, row: dict) -> None:
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.log_dir))
            _writers.append(self)
        scalars = {"train/loss": row.get("loss"), "train/aggregate_norm": row.get("aggregate_norm"),
                   "train/update_norm_mean": row.get("update_norm_mean"),
                   "train/clipped_fraction": row.get("clipped_fraction"), "train/seconds": row.get("seconds"),
                   "train/tasks": len(row.get("tasks", []))}
        if self.epsilon is not None:
            scalars["privacy/epsilon"] = self.epsilon(server_round)
        for tag, value in scalars.items():
            if value is not None and math.isfinite(value):
                self.writer.add_scalar(tag, float(value), global_step=server_round)
        if server_round >= self.rounds:
            self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self in _writers:
            _writers.remove(self)
