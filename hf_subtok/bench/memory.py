"""Peak resident memory of this process while a block runs (sampled by a thread)."""

from __future__ import annotations

import threading

import psutil


class PeakRSS:
    """`with PeakRSS() as peak: ...` then `peak.peak_mb`, `peak.start_mb`.

    Samples RSS every `interval` seconds; short spikes between samples can be missed.
    """

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self._process = psutil.Process()
        self._stop = threading.Event()
        self.start_bytes = self.peak_bytes = 0

    def __enter__(self) -> PeakRSS:
        self.start_bytes = self.peak_bytes = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_bytes = max(self.peak_bytes, self._process.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, self._process.memory_info().rss)

    @property
    def peak_mb(self) -> float:
        return self.peak_bytes / 2**20

    @property
    def start_mb(self) -> float:
        return self.start_bytes / 2**20
