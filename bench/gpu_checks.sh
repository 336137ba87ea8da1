#!/usr/bin/env bash
# The CUDA checks, one stage per call on a GPU machine:
#   throughput  bench/gpu_check.py: bf16 training steps with both encoders fine-tuned, MFU, GPU FAISS if built
#   tests       the gpu-marked tests (tests/test_gpu.py): bf16 training through train.py, export on the GPU
#   quality     bench/quality.py's SASRec and multimodal rows on ml100k_mm trained on the GPU (trainer=gpu)
#
#   bash bench/gpu_checks.sh throughput|tests|quality [out folder; default $OUT, else logs/bench/gpu]
#
# A machine without some dependencies can be given wheels under .whl/<any>/ (installed into /tmp/site); a
# wheel too large to travel in one piece comes as NAME.whl.part1, NAME.whl.part2, ... (split -b), joined here.
set -uo pipefail
stage=${1:?"which stage: throughput, tests or quality"}
out=${2:-${OUT:-logs/bench/gpu}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
shopt -s nullglob

wheels=(.whl/*/*.whl)
for first in .whl/*/*.whl.part1; do
  name=$(basename "${first%.part1}") i=1
  : >"/tmp/$name"
  while part=(.whl/*/"$name.part$i") && ((${#part[@]})); do cat "${part[0]}" >>"/tmp/$name"; i=$((i + 1)); done
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
  throughput)
    python3 bench/gpu_check.py --out "$out" 2>&1 | tee "$out/gpu_check.log" ;;
  tests)
    python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py 2>&1 | tee "$out/pytest_gpu.log" ;;
  quality)
    runs=logs/bench/gpu_quality
    python3 bench/quality.py --models sasrec multimodal --seeds 0 --out "$runs" -- trainer=gpu 2>&1 \
      | tee "$out/quality.log"
    cp "$runs/quality.json" "$out/" && cp "$runs/multimodal_seed0/metrics.json" "$out/multimodal_metrics.json" ;;
  *)
    echo "unknown stage $stage (throughput, tests or quality)" >&2; exit 2 ;;
esac
