"""The kernels folder is installed as `llmq.kernels` and never shadows Hugging Face's `kernels`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROBE = (
    "import kernels, transformers.integrations.hub_kernels as hk\n"
    "from transformers.utils.import_utils import is_kernels_available as f\n"
    "print(f(), kernels.__file__)\n"
)


def _run(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    # `python -c` puts the working directory first on sys.path, as `python -m pytest` does
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_kernels_import_name_is_ours() -> None:
    import llmq.kernels

    assert Path(llmq.kernels.__file__).resolve().parent == ROOT / "kernels"
    assert callable(llmq.kernels.matmul)


def test_transformers_kernels_probe_from_the_repo_root(tmp_path: Path) -> None:
    # transformers imports Hugging Face's `kernels`; from the repo root it must get that package, not
    # this folder, and answer as it does anywhere else
    here, elsewhere = _run(PROBE, ROOT), _run(PROBE, tmp_path)
    assert here.returncode == 0, here.stderr
    assert elsewhere.returncode == 0, elsewhere.stderr
    assert here.stdout == elsewhere.stdout
    assert Path(here.stdout.split()[1]).resolve().parent != ROOT / "kernels"


def test_nothing_of_the_folder_imports_as_top_level_kernels() -> None:
    done = _run("import kernels.ops", ROOT)
    assert done.returncode != 0
    assert "No module named 'kernels.ops'" in done.stderr


def test_python_api_from_the_repo_root() -> None:
    # README's Python API opens a checkpoint config through transformers, which probes `kernels`
    done = _run(
        "import llmq, llmq.kernels, transformers; from transformers import AutoConfig; print('ok')", ROOT
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
