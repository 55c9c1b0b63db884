"""The writers' background I/O: jobs run in order, an error reaches the caller, a failed GGUF write
leaves no file behind."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from llmq.background import Background
from llmq.plan import TensorPlan
from llmq.writers import GGUFStreamWriter


def test_jobs_run_in_order_on_one_thread() -> None:
    io = Background("t", max_pending=2)
    seen: list[tuple[int, str]] = []
    for i in range(20):
        io.submit(
            lambda i=i: (time.sleep(0.001 * (i % 3)), seen.append((i, threading.current_thread().name)))
        )
    io.drain()
    assert [i for i, _ in seen] == list(range(20))
    assert len({name for _, name in seen}) == 1 and seen[0][1] != threading.current_thread().name
    io.close()


def test_an_error_is_raised_at_the_next_submit_and_every_drain_after() -> None:
    io = Background("t")
    done = threading.Event()
    ran: list[int] = []

    def fail() -> None:
        done.set()
        raise OSError("disk full")

    io.submit(fail)
    done.wait()
    time.sleep(0.05)
    with pytest.raises(OSError, match="disk full"):
        io.submit(lambda: ran.append(1))
    with pytest.raises(OSError, match="disk full"):
        io.drain()
    assert not ran  # nothing runs after a lost write
    io.close()


def test_settle_waits_and_ignores_errors() -> None:
    io = Background("t")
    ran: list[int] = []
    io.submit(lambda: (time.sleep(0.05), ran.append(1)))
    io.submit(lambda: 1 / 0)
    io.settle()
    assert ran == [1]
    io.close()


def _plan(name: str) -> TensorPlan:
    return TensorPlan(name=name, source=None, shape=(4, 32), codec="F32", group=32, layer=None, role="norm")


def test_gguf_write_error_reaches_commit_and_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "x.gguf"
    w = GGUFStreamWriter(out, "llama")
    plans = [_plan("a.weight"), _plan("b.weight")]
    w.begin(plans)

    def full(*_a: object, **_k: object) -> None:
        raise OSError("No space left on device")

    monkeypatch.setattr(w.gguf, "write_tensor_data", full)
    for p in plans:
        try:
            w.write(p, np.zeros((4, 32), np.float32))
        except OSError:
            break
    with pytest.raises(OSError, match="No space left"):
        w.commit()
    w.abort()
    assert not out.exists() and not list(tmp_path.iterdir())


def test_gguf_writes_land_in_order(tmp_path: Path) -> None:
    import gguf

    out = tmp_path / "x.gguf"
    plans = [_plan(f"t{i}.weight") for i in range(5)]
    with GGUFStreamWriter(out, "llama") as w:
        w.begin(plans)
        for i, p in enumerate(plans):
            w.write(p, np.full((4, 32), i, np.float32))
        w.commit()
    tensors = {t.name: t.data for t in gguf.GGUFReader(out).tensors}
    for i in range(5):
        assert (tensors[f"t{i}.weight"] == i).all()
