"""Progress of the per-layer loop: a bar with elapsed time and ETA, the layer's current phase,
refreshed every few seconds even inside a long step, and the time each layer and phase took."""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from tqdm.auto import tqdm

PHASES = ("calibrate", "search", "encode", "write")


class LayerProgress:
    """A tqdm bar over decoder layers plus timings.

    Args:
        total: decoder layers.
        desc: the bar's label.
        enabled: draw the bar (timings are kept either way).
        interval: seconds between redraws while a step runs.

    Example:
        >>> prog = LayerProgress(30, "awq Q4_K_M", enabled=True)
        >>> with prog.phase("layer 0", "search"):
        ...     run_search()
        >>> prog.layer_done(0)
    """

    def __init__(self, total: int, desc: str, *, enabled: bool, interval: float = 2.0) -> None:
        self.bar = tqdm(total=total, desc=desc, unit="layer", disable=not enabled)
        self.phase_seconds = dict.fromkeys(PHASES, 0.0)
        self.layer_seconds: dict[int, float] = {}
        self.replayed = 0
        self._layer_start = time.perf_counter()
        self._stop = threading.Event()
        self._thread = None
        if enabled:  # tqdm redraws only when called: keep elapsed time moving during a long step
            self._thread = threading.Thread(target=self._tick, args=(interval,), daemon=True)
            self._thread.start()

    def _tick(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.bar.refresh()

    @contextmanager
    def phase(self, what: str, name: str) -> Iterator[None]:
        """Time step ``name`` (one of `PHASES`) of ``what`` (``layer 3``, a tensor) and show it on the bar."""
        self.bar.set_postfix_str(f"{what}: {name}", refresh=True)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.phase_seconds[name] += time.perf_counter() - t0

    def layer_done(self, index: int, *, replayed: bool = False) -> None:
        now = time.perf_counter()
        if replayed:
            self.replayed += 1
        else:
            self.layer_seconds[index] = now - self._layer_start
        self._layer_start = now
        self.bar.update(1)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.bar.set_postfix_str("", refresh=False)
        self.bar.close()

    def summary(self) -> str:
        """One line: layers done here, seconds per layer (median, max) and per phase."""
        if not self.layer_seconds:
            return f"{self.replayed} layers from the work directory" if self.replayed else ""
        secs = list(self.layer_seconds.values())
        slowest = max(self.layer_seconds, key=self.layer_seconds.__getitem__)
        text = (
            f"{len(secs)} layers, {statistics.median(secs):.1f} s per layer (median; slowest: layer "
            f"{slowest}, {self.layer_seconds[slowest]:.1f} s)"
        )
        phases = ", ".join(f"{k} {v:.1f} s" for k, v in self.phase_seconds.items() if v >= 0.05)
        if phases:
            text += f"; {phases}"
        if self.replayed:
            text += f"; {self.replayed} layers from the work directory"
        return text


__all__ = ["PHASES", "LayerProgress"]
