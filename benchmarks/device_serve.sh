#!/usr/bin/env bash
# Serving and inference-engine figures on a GPU machine (the ones docs/benchmarks.md records), from the
# repository root, with fbgemm-gpu/torchrec/grpc staged as ../shared/gpu/README.md says. Results in $OUT.
#
#   bash benchmarks/device_serve.sh [export dir]     # default: a random ML-1M-sized export
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-./out}
mkdir -p "$OUT"
python3 -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. protos/genrec/v1/recommender.proto
art=${1:+--artifact $1}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/card.txt"
quiet() { grep -v -i -E "warn|fbgemm|^ *$|0m|PyTorch 2"; }
# CUDA-graph and bf16 kernel parity tests first: a figure from a wrong kernel is worth nothing.
timeout 240 python3 -m pytest -q -m gpu tests/test_serving_kv_cache.py tests/test_hstu_attention.py 2>&1 | tail -3 \
  | tee "$OUT/gpu-tests.txt"
timeout 120 python3 -m benchmarks.engine --device cuda $art 2>&1 | quiet | tee "$OUT/bench-engine.txt"
timeout 60 python3 -m benchmarks.serve --suite engine --device cuda $art 2>&1 | quiet | tee "$OUT/serve-engine.txt"
timeout 180 python3 -m benchmarks.serve --suite compare --device cuda --duration 3 --bisect-steps 5 $art 2>&1 | quiet \
  | tee "$OUT/serve-compare.txt"
timeout 90 python3 -m benchmarks.serve --suite chunking --device cuda --duration 5 --qps 200 $art 2>&1 | quiet \
  | tee "$OUT/serve-chunking.txt"
