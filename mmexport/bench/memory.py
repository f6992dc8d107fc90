"""Resident memory of this process: RSS sampling in a thread plus the kernel's high-water mark."""
from __future__ import annotations

import os
import threading

MB = 1024 * 1024


def rss_bytes() -> int:
    """This process's resident set size (psutil, else /proc/self/statm; 0 where neither works)."""
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        pass
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _read_hwm() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


class RssMonitor:
    """Peak RSS over a block: a daemon thread samples every `interval` s; the kernel's high-water mark,
    reset at the start, catches spikes between samples where the platform allows it."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._hwm = False

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> "RssMonitor":
        self._hwm = _reset_hwm()
        self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._run, name="mmexport-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        if self._hwm:
            self.peak = max(self.peak, _read_hwm())

    @property
    def method(self) -> str:
        return f"RSS sampled every {self.interval * 1e3:g} ms ({self.samples} samples)" + (" + VmHWM" if self._hwm else "")
