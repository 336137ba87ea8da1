#!/usr/bin/env bash
# The CUDA checks, one stage per call on a GPU machine:
#   throughput  bench/gpu_check.py: bf16 training steps with both encoders fine-tuned, MFU, GPU FAISS if built
#   tests       the gpu-marked tests (tests/test_gpu.py): bf16 training through train.py, export on the GPU
#   quality     bench/quality.py's SASRec and multimodal rows on ml100k_mm trained on the GPU (trainer=gpu),
#               seeds $SEEDS (default 0-4); the processed data/ml100k_mm must be there
#
#   bash bench/gpu_checks.sh install|throughput|tests|quality [out folder; default $OUT, else logs/bench/gpu]
#
# A machine without some dependencies can be given wheels under .whl/<any>/, installed into /tmp/site
# (bench/gpu_wheels.sh fetches them and says which call carries which). A wheel too large to travel in one piece
# comes as NAME.whl.part1, NAME.whl.part2, ... (split -b), over several calls to the same machine if need be
# (`install` stage): the parts wait in /tmp/wheel_parts until all are there.
set -uo pipefail
stage=${1:?"which stage: throughput, tests or quality"}
out=${2:-${OUT:-logs/bench/gpu}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
shopt -s nullglob

wheels=(.whl/*/*.whl)
mkdir -p /tmp/wheel_parts && for part in .whl/*/*.whl.part*; do cp "$part" /tmp/wheel_parts/; done
for first in /tmp/wheel_parts/*.whl.part1; do
  name=$(basename "${first%.part1}") i=1
  : >"/tmp/$name"
  while [ -f "/tmp/wheel_parts/$name.part$i" ]; do
    cat "/tmp/wheel_parts/$name.part$i" >>"/tmp/$name" && i=$((i + 1))
  done
  if python3 -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1])" "/tmp/$name" 2>/dev/null; then
    wheels+=("/tmp/$name")
  else
    echo "$name: parts 1..$((i - 1)) do not make a whole wheel yet; not installed"
  fi
done
if ((${#wheels[@]})); then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "${wheels[@]}" || exit 1
fi
nvidia-smi -L || echo "no nvidia-smi"

case "$stage" in
  install) ;;  # only the wheels above
  throughput)
    python3 bench/gpu_check.py --out "$out" 2>&1 | tee "$out/gpu_check.log" ;;
  tests)
    python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py 2>&1 | tee "$out/pytest_gpu.log" ;;
  quality)
    runs=logs/bench/gpu_quality
    seeds=${SEEDS:-0 1 2 3 4}  # about a minute a seed for both models on an H200
    python3 bench/quality.py --models sasrec multimodal --seeds $seeds --out "$runs" -- trainer=gpu 2>&1 \
      | tee "$out/quality.log"
    cp "$runs/quality.json" "$out/"
    for seed in $seeds; do cp "$runs/multimodal_seed$seed/metrics.json" "$out/multimodal_seed$seed.json"; done ;;
  *)
    echo "unknown stage $stage (throughput, tests or quality)" >&2; exit 2 ;;
esac
