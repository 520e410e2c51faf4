"""Progress for long commands (`make train`, `vtfuse export`, `make bench`): tqdm on a terminal, plain lines otherwise.

On a TTY, `Steps` is a tqdm bar and `stage` a tqdm line whose elapsed time ticks; elsewhere
(CI logs, files) both print a plain line at most every `interval_s` seconds, so a log shows
the job is alive and how far it got without a carriage-return mess. `VTFUSE_PROGRESS=plain`
forces the plain lines, `VTFUSE_PROGRESS=off` silences both. Everything goes to stderr.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any


def mode(stream: IO[str] | None = None) -> str:
    """"bar" (a terminal), "plain" (anything else) or "off" (`VTFUSE_PROGRESS=off`)."""
    forced = os.environ.get("VTFUSE_PROGRESS", "").lower()
    if forced in ("off", "plain"):
        return forced
    stream = stream or sys.stderr
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        tty = False
    return "bar" if (forced == "bar" or tty) and _has_tqdm() else "plain"


def _has_tqdm() -> bool:
    try:
        import tqdm  # noqa: F401
    except ImportError:  # the `server` extra brings it; without it, plain lines
        return False
    return True


def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Steps:
    """Counted progress (`update(n, **postfix)`); a context manager that closes itself."""

    def __init__(
        self, total: int | None, desc: str, unit: str = "it", interval_s: float = 30.0, stream: IO[str] | None = None
    ) -> None:
        self.total, self.desc, self.unit, self.interval_s = total, desc, unit, interval_s
        self.stream = stream or sys.stderr
        self.mode = mode(self.stream)
        self.n = 0
        self.postfix: dict[str, Any] = {}
        self._t0 = self._last = time.monotonic()
        self._bar: Any = None
        if self.mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, file=self.stream, dynamic_ncols=True)

    def update(self, n: int = 1, **postfix: Any) -> None:
        """`n` more done; `postfix` (e.g. loss=…) is shown with the count."""
        self.n += n
        if postfix:
            self.postfix.update(postfix)
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix(self.postfix, refresh=False)
            self._bar.update(n)
        elif self.mode == "plain":
            now = time.monotonic()
            if now - self._last >= self.interval_s:
                self._last = now
                print(self.line(now), file=self.stream, flush=True)

    def line(self, now: float | None = None) -> str:
        """The plain progress line: count, share, rate, elapsed, ETA and postfix."""
        elapsed = (now or time.monotonic()) - self._t0
        rate = self.n / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.desc}: {self.n}" + (f"/{self.total} ({100 * self.n / self.total:.0f}%)" if self.total else "")]
        parts.append(f"{rate:.2f} {self.unit}/s, elapsed {_duration(elapsed)}")
        if self.total and rate > 0:
            parts.append(f"ETA {_duration((self.total - self.n) / rate)}")
        parts += [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.postfix.items()]
        return ", ".join(parts)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.mode == "plain" and self.n:
            print(self.line() + " (done)", file=self.stream, flush=True)

    def __enter__(self) -> Steps:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextmanager
def stage(desc: str, interval_s: float = 30.0, stream: IO[str] | None = None) -> Iterator[None]:
    """One long step without a count: a ticking elapsed time on a TTY, start / still running / done lines elsewhere."""
    stream = stream or sys.stderr
    how = mode(stream)
    if how == "off":
        yield
        return
    t0 = time.monotonic()
    done = threading.Event()
    bar: Any = None
    if how == "bar":
        from tqdm import tqdm

        bar = tqdm(total=None, desc=desc, file=stream, bar_format="{desc}: {elapsed}", dynamic_ncols=True)
        tick = 1.0
    else:
        print(f"{desc}: started", file=stream, flush=True)
        tick = interval_s

    def ticker() -> None:
        while not done.wait(tick):
            if bar is not None:
                bar.refresh()
            else:
                print(f"{desc}: still running, {_duration(time.monotonic() - t0)}", file=stream, flush=True)

    thread = threading.Thread(target=ticker, name=f"progress {desc}", daemon=True)
    thread.start()
    ok = False
    try:
        yield
        ok = True
    finally:
        done.set()
        thread.join()
        if bar is not None:
            bar.close()
        print(f"{desc}: {'done' if ok else 'failed'} in {_duration(time.monotonic() - t0)}", file=stream, flush=True)
