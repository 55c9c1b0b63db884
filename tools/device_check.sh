#!/usr/bin/env bash
# The device checks, run as one command on a lent GPU machine (see BENCHMARKS.md "On a GPU").
#
# Here, once: the wheels the machine lacks go in .whl/ (gguf, array-api-compat, diskcache and the
# llama-cpp-python wheel pip built here, whose libggml the encoders and tests use), and a copy of the
# calibration text in .devdata/ (both ignored by git). Then, with the device tool:
#
#   run(command="bash tools/device_check.sh [ROWS]", carry=[".whl", ".devdata"], timeout_s=600)
#
# ROWS (default awq8b) are tools/bench_scale.py rows. Logs come back in $OUT.
set -uo pipefail
ROWS=${1:-awq8b}
OUT=${OUT:-/tmp/llmq-device-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
# the SmolLM2 tokenizer that the synthetic checkpoints borrow
[ -d .devdata/cache ] && export LLMQ_TEST_CACHE=$PWD/.devdata/cache
nvidia-smi -L | tee "$OUT/device.log"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/device.log"

# llmq through a link, outside the checkout: its kernels/ would shadow the package of that name that
# transformers probes for (python -P: the working directory is not put on the path either)
REPO=$PWD
mkdir -p /tmp/llmqpath && ln -sfn "$REPO/llmq" /tmp/llmqpath/llmq
export PYTHONPATH=/tmp/site:/tmp/llmqpath

# the codecs, the refinement, the searches, the feedback and a conversion on the GPU: the CPU's bytes
[ -n "${SKIP_TESTS:-}" ] || timeout ${TEST_TIMEOUT:-200} python3 -P -m pytest -q -p no:cacheprovider ${TESTS-tests/test_codecs_torch.py} \
    tests/test_device.py tests/test_krefine.py::test_refinement_of_tensors_gives_the_numpy_bytes 2>&1 | tee "$OUT/tests.log"

cd /tmp
timeout ${BENCH_TIMEOUT:-400} python3 "$REPO/tools/bench_scale.py" --rows "$ROWS" --device cuda --samples 128 \
    --calib "$REPO/.devdata/groups_merged.txt" --work /tmp/bs 2>&1 | tee "$OUT/bench.log"
