#!/usr/bin/env bash
# The real-size benchmark on a CUDA machine, in under 8 minutes: naive fp32, fp16, bitsandbytes
# int8 and nf4 (language model), batch 1 and 8. Writes benchmarks/results/real_size_cuda.{json,md}.
#   bash benchmarks/gpu.sh            (BLIP2_BENCH_DIR sets where the 20 GB random checkpoints go)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu.sh: PyTorch sees no CUDA GPU here; run benchmarks/real_size.py for the CPU figures." >&2
  exit 1
fi
# Install only what is missing: requirements.txt pins the CPU torch of our build machines, and a
# CUDA machine's own torch must stay.
if ! "$PY" -c "import transformers, accelerate, bitsandbytes, safetensors, PIL" 2>/dev/null; then
  grep -v '^torch==' requirements.txt | "$PY" -m pip install --quiet -r /dev/stdin
fi
export PYTHONUNBUFFERED=1 GRADIO_ANALYTICS_ENABLED=False
timeout "${BLIP2_GPU_BENCH_TIMEOUT:-470}" "$PY" benchmarks/real_size.py --device cuda \
  --configs naive-fp32,fp16,int8,nf4 --retrieval-configs fp16 --repeats 3 --batch 8 "$@"
