"""The kernels folder is installed as `llmq.kernels` and never breaks transformers' `kernels` probe."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_kernels_import_name_is_ours() -> None:
    import llmq.kernels

    assert Path(llmq.kernels.__file__).resolve().parent == ROOT / "kernels"


def test_transformers_probe_from_the_repo_root() -> None:
    # From the repo root, `kernels/` is importable as a top-level module; transformers imports it
    # to find a version. It must import cleanly and not pass for Hugging Face's package.
    code = "from transformers.utils.import_utils import is_kernels_available as f; print(f())"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
