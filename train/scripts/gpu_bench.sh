#!/usr/bin/env bash
# GPU benchmarks of the generator and the procedural world (run on the GPU machine from the repo
# root; wheels in .whl/ are installed first when present: the GPU image lacks omegaconf).
set -o pipefail
[ -d .whl ] && { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1; }
export PYTHONPATH=/tmp/site:$PWD
OUT=${OUT:-/tmp}
nvidia-smi --query-gpu=name,memory.total --format=csv
python3 -m pytest -q tests/test_cuda.py tests/test_transformer.py 2>&1 | tail -3
python3 -m worldmodel.bench --frames 200 2>&1 | tee $OUT/bench_gpu.txt
python3 -m worldmodel.bench --frames 100 --batch 8 2>&1 | tail -8 | tee -a $OUT/bench_gpu.txt
for chunk in 256; do
  python3 -m worldmodel.envs.bench --world procedural --batch 256 --steps 20 --chunk $chunk 2>&1 | tee -a $OUT/bench_gpu.txt
  python3 -m worldmodel.envs.bench --world procedural --batch 256 --steps 20 --chunk $chunk --compile 2>&1 | tail -1 | tee -a $OUT/bench_gpu.txt
done
python3 -m worldmodel.envs.bench --world procedural --batch 1024 --steps 10 --chunk 256 --compile 2>&1 | tail -1 | tee -a $OUT/bench_gpu.txt
