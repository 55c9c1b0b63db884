"""Build llama.cpp's own `llama-perplexity` (and `llama-quantize`, `llama-imatrix`) from the llama-cpp-python
sdist, and run it.

The test suite checks that `llmq.eval.perplexity` (which drives llama.cpp through llama-cpp-python)
reports the same figure as llama.cpp's reference tool on the same GGUF. The tool must come from the
very llama.cpp sources the installed bindings were built from, so this script downloads the
llama-cpp-python sdist of the installed version (it vendors llama.cpp under `vendor/llama.cpp`),
builds only the `llama-perplexity`, `llama-quantize` and `llama-imatrix` targets (the latter two
prove llama.cpp reads the importance-matrix files llmq writes and computes the same importance
matrix), statically linked against llama/ggml, and caches them:

    $LLMQ_TEST_CACHE (or ~/.cache/llmq-tests)/llama.cpp-<version>/bin/llama-{perplexity,quantize,imatrix}

The build happens in a temporary folder beside the cache entry and is renamed into place at the
end, so a half-built entry is never visible. It takes about ten minutes on two busy cores.

Usage:
    python tools/build_llama_perplexity.py [--cache DIR] [--jobs N]   # prints the binary's path
"""

# No `from __future__ import annotations`: tools are loaded by path (tests/conftest.py's _load_tool)
# without a sys.modules entry, and dataclasses cannot resolve string annotations then.
import argparse
import contextlib
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

BINARY = "llama-perplexity"
# every target built into the cache entry; an entry missing one is rebuilt
BINARIES = (BINARY, "llama-quantize", "llama-imatrix")

# CMake cache entries for a minimal static CPU build of the tools. GGML_NATIVE and GGML_OPENMP keep
# their defaults (ON), as in the llama-cpp-python build whose figures we compare against.
CMAKE_FLAGS: tuple[str, ...] = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",  # libllama/libggml linked in: the cache folder is self-contained
    "-DLLAMA_BUILD_COMMON=ON",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_OPENSSL=OFF",  # no HTTPS model downloads: we only read local files
    "-DLLAMA_TOOLS_INSTALL=OFF",
)

__all__ = [
    "CMAKE_FLAGS",
    "LlamaPerplexityReport",
    "build_llama_perplexity",
    "default_cache_dir",
    "llama_perplexity_report",
    "run_llama_perplexity",
]


class BuildError(RuntimeError):
    """The download, configure or build step failed; the message ends with the log's tail."""


def default_cache_dir() -> Path:
    """`$LLMQ_TEST_CACHE`, else ~/.cache/llmq-tests (the same place as tests/conftest.py)."""
    return Path(os.environ.get("LLMQ_TEST_CACHE") or Path.home() / ".cache" / "llmq-tests").expanduser()


def _jobs() -> int:
    env = os.environ.get("LLMQ_BUILD_JOBS")
    if env:
        return max(1, int(env))
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def _tail(path: Path, n_lines: int = 40) -> str:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-n_lines:])


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """An exclusive advisory lock, so concurrent test sessions build only once."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(lock_path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run_logged(cmd: Sequence[str], log: Path, step: str, cwd: Path | None = None) -> None:
    with open(log, "a", encoding="utf-8") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n")
        fh.flush()
        rc = subprocess.run(list(cmd), cwd=cwd, stdout=fh, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise BuildError(f"{step} failed (exit {rc}); full log: {log}\n--- log tail ---\n{_tail(log)}")


def _extract_llama_cpp(sdist: Path, dest: Path) -> Path:
    """Extract only `<top>/vendor/llama.cpp/` of the sdist; returns that folder."""
    with tarfile.open(sdist) as tar:
        members = [
            m
            for m in tar.getmembers()
            if "/vendor/llama.cpp/" in m.name or m.name.endswith("/vendor/llama.cpp")
        ]
        if not members:
            raise BuildError(f"{sdist.name} has no vendor/llama.cpp folder")
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, members=members, filter="data")
        else:  # pragma: no cover - Python without PEP 706
            tar.extractall(dest, members=members)
    found = sorted(dest.glob("*/vendor/llama.cpp/CMakeLists.txt"))
    if not found:
        raise BuildError(f"{sdist.name}: vendor/llama.cpp/CMakeLists.txt missing")
    return found[0].parent


def build_llama_perplexity(
    cache_dir: Path | None = None,
    *,
    jobs: int | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Path of a `llama-perplexity` built from the installed llama-cpp-python's llama.cpp.

    Builds it once (download the sdist, cmake configure, build one target) and caches it under
    `cache_dir / f"llama.cpp-{version}" / "bin"`; later calls return the cached binary at once.

    Args:
        cache_dir: cache root; None = `$LLMQ_TEST_CACHE` or ~/.cache/llmq-tests.
        jobs: parallel compile jobs; None = `$LLMQ_BUILD_JOBS` or every usable CPU.
        log: receives progress lines.

    Raises:
        BuildError: a step failed; the message carries the tail of the build log.
    """
    version = importlib.metadata.version("llama-cpp-python")
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    entry = root / f"llama.cpp-{version}"
    binary = entry / "bin" / BINARY

    def complete() -> bool:
        return all(os.access(entry / "bin" / b, os.X_OK) and (entry / "bin" / b).is_file() for b in BINARIES)

    if complete():
        return binary
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise BuildError(f"building {BINARY} needs `{tool}` on PATH")
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f".llama.cpp-{version}.lock"):
        if complete():  # another process built it meanwhile
            return binary
        jobs = jobs or _jobs()
        build_log = root / f"llama.cpp-{version}.build.log"
        build_log.write_text(f"building {BINARY} from llama-cpp-python {version}\n", encoding="utf-8")
        t0 = time.monotonic()
        with tempfile.TemporaryDirectory(prefix=f".llama.cpp-{version}-", dir=root) as tmp_name:
            tmp = Path(tmp_name)
            log(f"[{BINARY}] downloading the llama-cpp-python {version} sdist")
            _run_logged(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "--no-deps",
                    "--no-binary",
                    ":all:",
                    "--disable-pip-version-check",
                    f"llama-cpp-python=={version}",
                    "-d",
                    str(tmp / "dl"),
                ],
                build_log,
                "pip download",
            )
            sdists = sorted((tmp / "dl").glob("*.tar.gz"))
            if not sdists:
                raise BuildError(f"pip download left no .tar.gz in {tmp / 'dl'}")
            log(f"[{BINARY}] extracting {sdists[0].name}")
            src = _extract_llama_cpp(sdists[0], tmp / "src")

            flags = list(CMAKE_FLAGS)
            if re.search(r"option\s*\(\s*LLAMA_CURL\b", (src / "CMakeLists.txt").read_text(encoding="utf-8")):
                flags.append("-DLLAMA_CURL=OFF")  # older llama.cpp: libcurl downloads are on by default
            generator = ["-G", "Ninja"] if shutil.which("ninja") else []
            build = tmp / "build"
            log(f"[{BINARY}] configuring: cmake {' '.join(flags)}")
            _run_logged(
                ["cmake", "-S", str(src), "-B", str(build), *generator, *flags], build_log, "cmake configure"
            )
            log(f"[{BINARY}] compiling with {jobs} job(s) (several minutes; log: {build_log})")
            _run_logged(
                [
                    "cmake",
                    "--build",
                    str(build),
                    "--target",
                    *BINARIES,
                    "--config",
                    "Release",
                    "-j",
                    str(jobs),
                ],
                build_log,
                "cmake build",
            )
            stage = tmp / "stage"
            (stage / "bin").mkdir(parents=True)
            for name in BINARIES:
                built = next((p for p in build.rglob(name) if p.is_file() and os.access(p, os.X_OK)), None)
                if built is None:
                    raise BuildError(f"the build finished but no {name} executable is in {build}")
                shutil.copy2(built, stage / "bin" / name)
            shutil.copy2(src / "LICENSE", stage / "LICENSE")
            seconds = time.monotonic() - t0
            (stage / "BUILD_INFO.txt").write_text(
                f"llama-cpp-python {version} sdist, vendor/llama.cpp\n"
                f"cmake {' '.join(generator + flags)}\n"
                f"cmake --build . --target {' '.join(BINARIES)} -j {jobs}\n"
                f"built in {seconds:.0f} s\n",
                encoding="utf-8",
            )
            if entry.exists():  # a leftover without all binaries (an older llmq's, or deleted by hand)
                shutil.rmtree(entry)
            os.rename(stage, entry)  # atomic within one file system
        shutil.copy2(build_log, entry / "build.log")
        build_log.unlink(missing_ok=True)
        log(f"[{BINARY}] built in {seconds:.0f} s: {binary}")
    return binary


# -- running --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LlamaPerplexityReport:
    """What `llama-perplexity` printed: the final PPL, its +/-, and the chunking it used."""

    ppl: float
    ppl_stderr: float
    n_chunks: int
    n_ctx: int
    chunk_ppl: tuple[float, ...]
    output: str
    seconds: float


_FINAL = re.compile(r"Final estimate: PPL = ([0-9.eE+-]+|nan|inf)\s+\+/-\s+([0-9.eE+-]+|nan|inf)")
_CHUNKS = re.compile(r"calculating perplexity over (\d+) chunks, n_ctx=(\d+)")
_RUNNING = re.compile(r"\[(\d+)\]([0-9.]+|nan|inf)")


def llama_perplexity_report(
    binary: str | os.PathLike[str],
    model: str | os.PathLike[str],
    text_file: str | os.PathLike[str],
    n_chunks: int,
    *,
    ctx: int = 512,
    threads: int | None = None,
    flash_attn: bool = False,
    extra_args: Sequence[str] = (),
    timeout: float | None = None,
) -> LlamaPerplexityReport:
    """Run `llama-perplexity -m MODEL -f FILE -c CTX --chunks N -fa on|off --no-repack`, parse its output.

    Flash attention is off by default to match llama-cpp-python's context default (the tool's own
    default is "auto", which turns it on for CPU). `threads=None` keeps the tool's default.

    Raises:
        RuntimeError: the tool failed or printed no final estimate; the message has its output tail.
    """
    cmd = [
        str(binary),
        "-m",
        str(model),
        "-f",
        str(text_file),
        "-c",
        str(ctx),
        "--chunks",
        str(n_chunks),
        "-fa",
        "on" if flash_attn else "off",
        "--no-repack",  # as llmq's llama-cpp-python runs: repacked AMX kernels crash (llmq.eval._llama)
    ]
    if threads is not None:
        cmd += ["-t", str(threads)]
    cmd += list(extra_args)
    t0 = time.monotonic()
    try:
        proc = subprocess.run(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout if isinstance(exc.stdout, str) else (exc.stdout or b"").decode("utf-8", "replace")
        raise RuntimeError(f"{' '.join(cmd)} timed out after {timeout} s:\n{out[-3000:]}") from exc
    seconds = time.monotonic() - t0
    out = proc.stdout
    final = _FINAL.search(out)
    if proc.returncode != 0 or final is None:
        raise RuntimeError(
            f"{' '.join(cmd)} failed (exit {proc.returncode}"
            f"{'' if final else ', no final estimate'}):\n{out[-3000:]}"
        )
    chunks = _CHUNKS.search(out)
    return LlamaPerplexityReport(
        ppl=float(final.group(1)),
        ppl_stderr=float(final.group(2)),
        n_chunks=int(chunks.group(1)) if chunks else -1,
        n_ctx=int(chunks.group(2)) if chunks else -1,
        chunk_ppl=tuple(float(v) for _, v in _RUNNING.findall(out)),
        output=out,
        seconds=seconds,
    )


def run_llama_perplexity(
    binary: str | os.PathLike[str],
    model: str | os.PathLike[str],
    text_file: str | os.PathLike[str],
    n_chunks: int,
    *,
    ctx: int = 512,
    threads: int | None = None,
    flash_attn: bool = False,
) -> float:
    """The "Final estimate: PPL" of `llama-perplexity` on `model` and `text_file` (see the report)."""
    return llama_perplexity_report(
        binary, model, text_file, n_chunks, ctx=ctx, threads=threads, flash_attn=flash_attn
    ).ppl


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="cache root (default: $LLMQ_TEST_CACHE or ~/.cache/llmq-tests)",
    )
    parser.add_argument(
        "--jobs", "-j", type=int, default=None, help="parallel compile jobs (default: all CPUs)"
    )
    args = parser.parse_args(argv)
    try:
        path = build_llama_perplexity(
            args.cache, jobs=args.jobs, log=lambda s: print(s, file=sys.stderr, flush=True)
        )
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
