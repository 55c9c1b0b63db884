"""tools/paired_ppl.py recovers per-chunk losses from llama-perplexity's running table."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from conftest import load_tool


def _log(path: Path, losses: list[float]) -> Path:
    # llama-perplexity --kl-divergence prints running means, one line per chunk, in this layout
    lines = ["chunk             PPL               ln(PPL(Q)/PPL(base))          KL Divergence"]
    for i in range(1, len(losses) + 1):
        ppl = math.exp(sum(losses[:i]) / i)
        lines.append(
            f"{i:4d}    {ppl:9.4f} ± {0.5:9.4f}    {-0.00123:10.5f} ± {0.001:10.5f}    0.006 ± 0.0001"
        )
    lines.append("Mean PPL(Q)                   :  22.5 ±   0.42")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_chunk_losses_and_paired_difference(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tool = load_tool("paired_ppl")
    a = [3.1 + 0.01 * (i % 7) for i in range(40)]
    b = [x - 0.002 for x in a]  # B is lower on every chunk by 0.002 nats
    got = tool.chunk_losses(_log(tmp_path / "a.log", a))
    assert len(got) == 40
    # the 4-decimal rounding of PPL ~22, amplified by the chunk index
    assert max(abs(x - y) for x, y in zip(got, a, strict=True)) < 2 * 40 * 0.5e-4 / 22
    _log(tmp_path / "b.log", b)
    assert tool.main([str(tmp_path / "a.log"), str(tmp_path / "b.log")]) == 0
    out = capsys.readouterr().out
    mean = float(out.split("= ")[1].split()[0])
    assert mean == pytest.approx(0.002, abs=3e-4) and "B lower in" in out
    row = "   {}    22.0000 ±    1.0000       0.00100 ±    0.00100    0.006 ± 0.0001\n"
    (tmp_path / "short.log").write_text(row.format(1) + row.format(3))  # chunk 2 missing
    with pytest.raises(SystemExit, match="no complete per-chunk table"):
        tool.chunk_losses(tmp_path / "short.log")
