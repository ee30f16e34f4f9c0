"""Memory of a block of code: the allocator's peak of live tensor bytes, and peak resident memory.

- `AllocatorPeak`: the most tensor bytes alive at once while a block runs, above those alive
  when it began. On CUDA it reads the caching allocator's statistics
  (`torch.cuda.max_memory_allocated`); on CPU, where torch keeps no allocator statistics, it
  runs the block under `torch.profiler.profile(profile_memory=True)` and adds up the
  allocation and free events in order. The figure is exact and the same from run to run, so
  it can be asserted in tests (chunked prefill, layer-wise packing).
- `PeakRSS`: the process's resident memory, sampled by a thread. It is what the operating
  system sees, allocator caching and fragmentation included, so it moves from run to run.
"""

from __future__ import annotations

import os
import sys
import threading
from contextlib import contextmanager

import psutil
import torch

_ALLOCATION = torch._C._profiler._EventType.Allocation  # the profiler's event of one allocation or free


class AllocatorPeak:
    """`with AllocatorPeak() as peak: ...`, then `peak.peak_bytes` and `peak.end_bytes`.

    `peak_bytes`: the most bytes alive at once among the tensors allocated inside the block
    (CPU), or the allocator's peak above its live bytes at entry (CUDA); `end_bytes`: those
    still alive at exit. Bytes alive before the block (model weights) are not counted, so the
    figure is what the block adds above them.

    CPU: the block runs under `torch.profiler.profile(profile_memory=True)` (no other
    profiler may be active), which slows many small ops; don't time code inside it. A tensor
    allocated before the block and freed inside it does not lower the figure (on CUDA it
    does). Only allocations through torch's CPU allocator are seen, not a library's private
    scratch memory.

    Args:
        device: "cpu" or a CUDA device ("cuda", "cuda:1", a `torch.device`).
    """

    def __init__(self, device: str | torch.device = "cpu"):
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device must be cpu or cuda, got {device!r}") from None
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {device!r}")
        self.peak_bytes = self.end_bytes = 0
        self._profiler = None
        self._start = 0

    def __enter__(self) -> AllocatorPeak:
        self.peak_bytes = self.end_bytes = 0
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            self._profiler = torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True,
                record_shapes=False, with_stack=False,
            )
            with _quiet_stderr():
                self._profiler.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = max(torch.cuda.max_memory_allocated(self.device) - self._start, 0)
            self.end_bytes = torch.cuda.memory_allocated(self.device) - self._start
            return
        profiler, self._profiler = self._profiler, None
        with _quiet_stderr():
            profiler.__exit__(*exc)
        self.peak_bytes, self.end_bytes = live_bytes_peak(_cpu_allocations(profiler))

    @property
    def peak_mb(self) -> float:
        return self.peak_bytes / 2**20


@contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 for a moment: kineto writes two log lines to it at every
    profiler start and stop, whatever its log level."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_allocations(profiler) -> list[tuple[int, int]]:
    """`(address, bytes)` of each CPU allocation (+bytes) and free (-bytes) the profiler saw,
    in time order."""
    events = []
    stack = list(profiler.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _ALLOCATION and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.ptr, node.extra_fields.alloc_size))
    events.sort(key=lambda e: e[0])
    return [(ptr, size) for _, ptr, size in events]


def live_bytes_peak(events) -> tuple[int, int]:
    """`(peak, end)` bytes alive at once among the blocks allocated in `events`.

    `events`: `(address, bytes)` in time order, +bytes an allocation, -bytes a free. A free of
    an address not allocated in `events` (a tensor from before) is ignored.
    """
    held: dict[int, int] = {}
    live = peak = 0
    for address, size in events:
        if size > 0:
            live += size - held.get(address, 0)  # an address reused without a seen free
            held[address] = size
            peak = max(peak, live)
        elif address in held:
            live -= held.pop(address)
    return peak, live


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
        self._stop.clear()
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

    @property
    def added_bytes(self) -> int:
        """Peak RSS above the RSS at entry."""
        return self.peak_bytes - self.start_bytes
