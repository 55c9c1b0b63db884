"""The per-layer progress: phases timed and shown, redrawn during a long step, summarized."""

from __future__ import annotations

import time

import pytest

from llmq.progress import PHASES, LayerProgress


def test_phases_are_timed_shown_and_summarized(monkeypatch: pytest.MonkeyPatch) -> None:
    prog = LayerProgress(3, "awq Q4_K_M", enabled=True, interval=0.05)
    redraws = {"n": 0}
    original = prog.bar.refresh

    def counting(*a, **k):  # noqa: ANN002, ANN003
        redraws["n"] += 1
        return original(*a, **k)

    monkeypatch.setattr(prog.bar, "refresh", counting)
    prog.layer_done(0, replayed=True)
    with prog.phase("layer 1", "search"):
        assert "layer 1: search" in str(prog.bar)
        time.sleep(0.3)  # a long step: the bar keeps being redrawn
    assert redraws["n"] >= 3
    with prog.phase("layer 1", "encode"):
        time.sleep(0.01)
    prog.layer_done(1)
    with prog.phase("layer 2", "search"):
        time.sleep(0.1)
    prog.layer_done(2)
    prog.close()
    assert set(prog.phase_seconds) == set(PHASES)
    assert prog.phase_seconds["search"] >= 0.4 and list(prog.layer_seconds) == [1, 2]
    text = prog.summary()
    assert "2 layers" in text and "slowest: layer 1" in text and "search 0." in text
    assert "1 layers from the work directory" in text


def test_disabled_progress_still_times() -> None:
    prog = LayerProgress(1, "rtn", enabled=False)
    with prog.phase("layer 0", "encode"):
        pass
    prog.layer_done(0)
    prog.close()
    assert "1 layers" in prog.summary()
