#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one go (CI has no GPU; run this where one is):
#   bash benchmarks/gpu_check.sh [OUT_DIR]
# 1. the CUDA tests (cores, grid encoder, two processes on CUDA), 2. benchmarks/scaling.py --gpu (each core's
# CUDA forward+backward against nn.LSTM, PPO frames/s on DoorKey and Pong with 1 and 2 processes), 3. six
# DoorKey learning runs with device=cuda side by side, 4. the whole test suite on the GPU machine (SB3's
# device="auto" puts the interop tests' models on the GPU; needs pytest-xdist and pytest-timeout, else it is
# skipped with a message). About 8 minutes on one H200 with 16 CPU cores.
# Logs and the scaling rows go to OUT_DIR (default benchmarks/out/gpu).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/out/gpu}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 - <<'PY' 2>&1 | tee "$out/machine.log"
import os, platform, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-", "cpus", os.cpu_count(), platform.processor())
PY
echo "== 1. CUDA tests"; start=$SECONDS
timeout 240 python3 -m pytest -q -p no:cacheprovider -rs tests/test_cores.py tests/test_grid_kernel.py \
  tests/test_distributed.py -k "cuda" 2>&1 | tee "$out/cuda_tests.log"
echo "   ($((SECONDS - start)) s)"
echo "== 2. scaling --gpu"; start=$SECONDS
timeout 300 python3 benchmarks/scaling.py --gpu --no-cpu --updates 4 --json "$out/scaling_gpu.json" 2>&1 \
  | tee "$out/scaling_gpu.log"
echo "   ($((SECONDS - start)) s)"
echo "== 3. DoorKey learning on CUDA (embedded RIMs default, seeds 1-6 side by side, 100k frames each)"; start=$SECONDS
for seed in 1 2 3 4 5 6; do
  rm -rf "/tmp/gpu-learn-$seed"
  OMP_NUM_THREADS=1 timeout 300 python3 train.py device=cuda seed=$seed total_frames=100000 torch_threads=1 \
    log.progress_bar=false --run-dir "/tmp/gpu-learn-$seed" > "/tmp/gpu-learn-$seed.log" 2>&1 &
done
wait
python3 - <<'PY' 2>&1 | tee "$out/learn_cuda.log"
import json, pathlib
for seed in range(1, 7):
    path = pathlib.Path(f"/tmp/gpu-learn-{seed}/metrics.jsonl")
    if not path.exists():
        print("seed", seed, "failed:", pathlib.Path(f"/tmp/gpu-learn-{seed}.log").read_text()[-300:])
        continue
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    hit = next((r["frames"] for r in rows if (r.get("rollout/ep_return_mean") or 0) >= 0.9), None)
    print("seed", seed, "frames", rows[-1]["frames"], "final return", round(rows[-1]["rollout/ep_return_mean"], 3),
          "first >= 0.9 at", hit)
PY
echo "   ($((SECONDS - start)) s)"
echo "== 4. the whole suite on the GPU machine"; start=$SECONDS
if python3 -c "import xdist, pytest_timeout" 2>/dev/null; then
  timeout 300 python3 -m pytest -q -p no:cacheprovider -n 12 --timeout 240 -W ignore 2>&1 | tail -40 | tee "$out/suite.log"
else  # not in the [test] extra: the suite in one process would not fit this step's 5 minutes
  echo "skipped: needs pytest-xdist and pytest-timeout (pip install pytest-xdist pytest-timeout)" | tee "$out/suite.log"
fi
echo "   ($((SECONDS - start)) s)"
