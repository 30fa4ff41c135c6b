"""Progress bars on stderr (a live bar on a terminal, a line every few seconds otherwise)."""

import sys
import time


class Bar:
    WIDTH = 28

    def __init__(self, label: str, total: float, unit: str = "s") -> None:
        self.label = label
        self.total = max(total, 1e-9)
        self.unit = unit
        self.done = 0.0
        self.note = ""
        self.started = time.monotonic()
        self._tty = sys.stderr.isatty()
        self._last = 0.0
        self._draw(force=True)

    def update(self, done: float, note: str = "") -> None:
        self.done = done
        self.note = note
        self._draw()

    def _line(self) -> str:
        frac = min(1.0, self.done / self.total)
        filled = int(frac * self.WIDTH)
        bar = "█" * filled + "░" * (self.WIDTH - filled)
        amount = f"{self.done:.0f}/{self.total:.0f}{self.unit}" if self.unit != "s" else f"{self.done:5.1f}/{self.total:.0f}s"
        return f"{self.label:<34} ▕{bar}▏ {amount} {self.note}"

    def _draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if self._tty:
            if force or now - self._last >= 0.1:
                sys.stderr.write("\r\x1b[2K" + self._line())
                sys.stderr.flush()
                self._last = now
        elif force or now - self._last >= 5.0:
            sys.stderr.write(self._line() + "\n")
            sys.stderr.flush()
            self._last = now

    def close(self, note: str | None = None) -> None:
        if note is not None:
            self.note = note
        self.done = max(self.done, 0)
        line = self._line() + f"  [{time.monotonic() - self.started:.1f}s]"
        sys.stderr.write(("\r\x1b[2K" if self._tty else "") + line + "\n")
        sys.stderr.flush()


def say(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()
