#!/usr/bin/env bash
# The GPU benchmarks on a CUDA machine, each in under 9 minutes, on random-weight checkpoints of the
# real blip2-opt-2.7b architecture (built once into BLIP2_BENCH_DIR, 20 GB):
#   bash benchmarks/gpu.sh [real-size] [ARGS]   naive fp32, fp16, bitsandbytes int8 and nf4, batch 1
#                                               and 8: benchmarks/results/real_size_cuda.{json,md}
#   bash benchmarks/gpu.sh static-cache [ARGS]  static key/value cache and compiled decoding (CUDA
#                                               graphs) vs naive fp32, batch 1 and 8:
#                                               benchmarks/results/gpu_static_cache.{json,md}
# ARGS go to the Python script. A machine with no network gets its missing Python packages as
# wheels carried in .whl/ (static-cache needs only torch, transformers, tokenizers, accelerate and
# pillow; see docs/performance.md): they are installed into /tmp/site first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
what=real-size
case "${1:-}" in
  real-size | static-cache) what=$1; shift ;;
esac
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu.sh: PyTorch sees no CUDA GPU here (benchmarks/real_size.py gives the CPU figures)." >&2
  exit 1
fi
export PYTHONUNBUFFERED=1 GRADIO_ANALYTICS_ENABLED=False
if [ "$what" = static-cache ]; then
  workdir=${BLIP2_BENCH_DIR:-$HOME/.cache/blip2-studio/real-size}
  # The same checkpoint as real_size.py's (built on the GPU in seconds, then written to disk once).
  "$PY" -c 'import sys; from pathlib import Path; sys.path.insert(0, "."); from benchmarks.real_size import build_checkpoints; build_checkpoints(Path(sys.argv[1]), 1, "cuda")' "$workdir"
  exec timeout "${BLIP2_GPU_BENCH_TIMEOUT:-480}" "$PY" benchmarks/gpu_static_cache.py --device cuda \
    --model "$workdir/blip2-opt-2.7b-random" "$@"
fi
# Install only what is missing: requirements.txt pins the CPU torch of our build machines, and a
# CUDA machine's own torch must stay.
if ! "$PY" -c "import transformers, accelerate, bitsandbytes, safetensors, PIL" 2>/dev/null; then
  grep -v '^torch==' requirements.txt | "$PY" -m pip install --quiet -r /dev/stdin
fi
timeout "${BLIP2_GPU_BENCH_TIMEOUT:-470}" "$PY" benchmarks/real_size.py --device cuda \
  --configs naive-fp32,fp16,int8,nf4 --retrieval-configs fp16 --repeats 3 --batch 8 "$@"
