#!/usr/bin/env bash
# Everything a lent GPU machine checks, in one call: the CUDA tests, then the GPU benchmarks.
# Usage (repository root, on the GPU machine): bash bench/gpu_check.sh [OUT_DIR]
# Python packages the GPU image lacks may travel as wheels in .whl/ (installed to /tmp/site first).
set -uo pipefail
out=${1:-${OUT:-gpu-out}}
mkdir -p "$out" && out=$(cd "$out" && pwd)
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$out/gpu.txt"
python3 -m pytest -p no:cacheprovider -q -rs tests/test_gpu.py 2>&1 | tee "$out/tests.log"
for batch in ${TRAIN_GPU_BATCHES:-4}; do
    (cd bench && python3 train_gpu.py --batch "$batch" --markdown "$out/train_gpu_b$batch.md") 2>&1 | tee "$out/train_gpu_b$batch.log"
done
for batch in ${TRAIN_GPU_COMPILED_BATCHES:-}; do  # larger batches: the compiled step only
    (cd bench && python3 train_gpu.py --batch "$batch" --no-eager --no-baseline --markdown "$out/train_gpu_b$batch.md") \
        2>&1 | tee "$out/train_gpu_b$batch.log"
done
if [ -n "${GENERATE_ARGS:-}" ]; then
    (cd bench && python3 generate.py $GENERATE_ARGS) 2>&1 | tee "$out/generate.log"
fi
