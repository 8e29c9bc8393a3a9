#!/usr/bin/env bash
# The GPU checks of this project in one run (a GPU machine is lent only now and then):
#   1. the tests that need CUDA (offload slots, half precision, txt2img on the GPU),
#   2. bench_sr at full size: resident vs offload (prefetch on / off), fp16, 200 steps,
#   3. the same with torch.profiler traces of the offloaded run (for a slow-step diagnosis),
#   4. bench_unet fp16 (cached / per-forward / packed FFN-MoE experts).
# Usage: bash benchmarks/gpu_checks.sh OUT_DIR [STEPS]
# Writes OUT_DIR/{tests.log, bench_sr_fp16.{log,json}, profile_*, bench_unet_fp16.log}. Needs the package installed
# (`make install`, or `pip install -e .` on a machine that already has torch).
set -euo pipefail
out=${1:?usage: bash benchmarks/gpu_checks.sh OUT_DIR [STEPS]}
steps=${2:-200}
mkdir -p "$out"
py=${PYTHON:-python3}

"$py" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"

echo "== CUDA tests"
HF_HUB_OFFLINE=1 "$py" -m pytest -q -x -p no:cacheprovider \
    tests/test_pipeline.py tests/test_unet.py tests/test_txt2img.py 2>&1 | tee "$out/tests.log" | tail -3

echo "== bench_sr fp16, $steps steps"
"$py" benchmarks/bench_sr.py --device cuda --steps "$steps" --dtype fp16 --vae-fp32 \
    --policies resident offload offload-noprefetch --json "$out/bench_sr_fp16.json" \
    | tee "$out/bench_sr_fp16.log"

echo "== profiles (20 steps)"
"$py" benchmarks/bench_sr.py --device cuda --steps 20 --dtype fp16 --vae-fp32 \
    --policies resident offload --profile "$out/profile" > "$out/profile_table.log"
tail -n +1 "$out"/profile_*.txt | head -60

echo "== bench_unet fp16"
"$py" benchmarks/bench_unet.py --device cuda --dtype float16 --repeats 10 | tee "$out/bench_unet_fp16.log"
