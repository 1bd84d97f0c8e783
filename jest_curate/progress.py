"""What a person sees during long commands: one line per round, quiet logs, a full log file.

`jest-curate rounds` and `jest-curate demo` print one progress line per round (round i/n,
examples, the round's zero-shot accuracy, elapsed time and ETA) and keep Beam's and the
trainer's INFO lines out of the terminal unless `-v`; every INFO line still goes to
`log.txt` in the run directory.
"""
import logging
import os
import sys
import time
from typing import Callable, Optional, TextIO

__all__ = ["add_verbose_flag", "configure_logging", "RoundProgress", "format_duration"]

_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
_OURS = "_jest_curate_handler"


def add_verbose_flag(parser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also print Beam's and the trainer's INFO lines (always in "
                             "OUTPUT/log.txt)")


def configure_logging(log_file: Optional[str], *, verbose: bool) -> None:
    """Terminal: warnings (INFO too with `verbose`); `log_file` (a local path): everything.

    Replaces the handlers an earlier call installed, so it can be called once per command.
    """
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, _OURS, False)]:
        root.removeHandler(handler)
        handler.close()
    root.setLevel(logging.INFO)
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.INFO if verbose else logging.WARNING)
    handlers = [console]
    if log_file is not None and "://" not in log_file:
        os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
        handlers.append(logging.FileHandler(log_file, mode="a", encoding="utf-8"))
    for handler in handlers:
        handler.setFormatter(logging.Formatter(_FORMAT))
        setattr(handler, _OURS, True)
        root.addHandler(handler)


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class RoundProgress:
    """Prints one line per finished round; the ETA comes from rounds run in this process
    (rounds resumed from disk take no time and are marked as such)."""

    def __init__(self, total: int, *, label: str = "", stream: Optional[TextIO] = None,
                 clock: Callable[[], float] = time.monotonic):
        self.total, self.label = total, label
        self._stream = stream
        self._clock = clock
        self._start = clock()
        self._ran = 0

    def __call__(self, record: dict, *, resumed: bool = False) -> str:
        done = record["round"] + 1
        elapsed = self._clock() - self._start
        if not resumed:
            self._ran += 1
        parts = [f"{self.label}round {done}/{self.total}",
                 f"{record['examples_seen']:,} examples"]
        accuracy = (record.get("eval") or {}).get("zeroshot_top1")
        if accuracy is not None:
            parts.append(f"zero-shot {accuracy:.3f}")
        parts.append("resumed" if resumed else f"{format_duration(elapsed)} elapsed")
        if self._ran and done < self.total:
            parts.append(f"ETA {format_duration(elapsed / self._ran * (self.total - done))}")
        line = " | ".join(parts)
        print(line, file=self._stream or sys.stdout, flush=True)
        return line
