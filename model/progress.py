"""Progress bars: tqdm when it is installed, otherwise a small built-in bar with the same calls."""

from __future__ import annotations

import sys
import time


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    clock = f"{hours:d}:{minutes:02d}:{secs:02d}"
    return f"{days}d {clock}" if days else clock


class _PlainBar:
    """Redraws one line on a terminal; prints at most every `every` seconds otherwise (logs)."""

    def __init__(self, total: int, initial: int, desc: str, stream):
        self.total, self.n, self.desc, self.stream = total, initial, desc, stream
        self.start, self.start_n, self.last = time.monotonic(), initial, 0.0
        self.postfix = ""
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self.every = 0.2 if self.tty else 30.0

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every or self.n >= self.total:
            self.last = now
            self._draw(now)

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def _draw(self, now: float) -> None:
        done = self.n - self.start_n
        rate = done / max(now - self.start, 1e-9)
        eta = (self.total - self.n) / rate if rate > 0 else 0.0
        filled = int(20 * self.n / max(self.total, 1))
        line = (
            f"{self.desc}: [{'#' * filled}{'.' * (20 - filled)}] {self.n}/{self.total} "
            f"eta {format_duration(eta)} {self.postfix}"
        ).rstrip()
        self.stream.write(("\r" + line) if self.tty else (line + "\n"))
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


class _NullBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


def progress(total: int, desc: str = "", initial: int = 0, enabled: bool = True):
    """A bar with update(n), set_postfix_str(text) and close()."""
    if not enabled:
        return _NullBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _PlainBar(total, initial, desc, sys.stderr)
    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, file=sys.stderr)
