#!/usr/bin/env bash
# The GPU checks of this project in one run (a GPU machine is lent only now and then):
#   1. the tests that need CUDA (offload slots, half precision, txt2img on the GPU),
#   2. bench_sr at full size: resident vs offload (prefetch on / off), fp16, 200 DDIM steps
#      (the offload switch overhead: target < 2 % of sampling),
#   3. the same with torch.profiler traces of the offloaded run (for a slow-step diagnosis),
#   4. bf16 vs fp16 resident steps, each with a profile (why bf16 steps were slower: 0.034 vs
#      0.021 s median in the last table),
#   5. the few-step solvers' time per 512x512 image (fp16, resident), with and without
#      torch.compile of the expert UNets (target: <= 1.5 s per image),
#   6. batched throughput, batch 1 / 4 / 8, full size, fp16, UniPC 15 steps (target: >= 2x the
#      batch-1 throughput at batch 8),
#   7. the FA-VAE decode sweep (LR 32..256 px) and bench_unet fp16.
# Usage: bash benchmarks/gpu_checks.sh OUT_DIR [STEPS] [QUICK]
#   QUICK=1 skips the profiles and the decode sweep (about half the time).
# Writes OUT_DIR/*.log / *.json. Needs the package installed
# (`make install`, or `pip install -e .` on a machine that already has torch).
set -euo pipefail
out=${1:?usage: bash benchmarks/gpu_checks.sh OUT_DIR [STEPS] [QUICK]}
steps=${2:-200}
quick=${3:-0}
mkdir -p "$out"
py=${PYTHON:-python3}
sr() { "$py" benchmarks/bench_sr.py --device cuda --vae-fp32 "$@"; }

"$py" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
date -u +"%Y-%m-%d %H:%M UTC" | tee "$out/date.txt"

echo "== 1. CUDA tests"
HF_HUB_OFFLINE=1 "$py" -m pytest -q -x -p no:cacheprovider \
    tests/test_pipeline.py tests/test_unet.py tests/test_solvers.py tests/test_txt2img.py 2>&1 \
    | tee "$out/tests.log" | tail -3

echo "== 2. offload overhead: bench_sr fp16, ddim $steps steps"
sr --steps "$steps" --dtype fp16 --policies resident offload offload-noprefetch \
    --json "$out/bench_sr_fp16.json" | tee "$out/bench_sr_fp16.log"

if [ "$quick" != 1 ]; then
    echo "== 3. offload profiles (20 steps)"
    sr --steps 20 --dtype fp16 --policies resident offload --profile "$out/profile" \
        > "$out/profile_table.log"
    tail -n +1 "$out"/profile_*.txt | head -60
fi

echo "== 4. bf16 vs fp16 (resident, 50 steps, profiled)"
for dt in fp16 bf16; do
    sr --steps 50 --dtype "$dt" --policies resident --profile "$out/dtype" \
        --json "$out/bench_sr_$dt.json" | tee "$out/bench_sr_$dt.log"
done
head -30 "$out"/dtype_resident_bf16.txt "$out"/dtype_resident_fp16.txt || true

echo "== 5. few-step solvers, time per 512x512 image (fp16, resident)"
for setting in "ddim 200" "ddim 25" "dpmpp-2m 10" "dpmpp-2m 15" "dpmpp-2m 25" "unipc 10" \
    "unipc 15" "unipc 25"; do
    set -- $setting
    sr --sampler "$1" --steps "$2" --dtype fp16 --policies resident \
        --json "$out/solver_$1_$2.json" | tee "$out/solver_$1_$2.log" | head -6
done
echo "-- torch.compile of the expert UNets (unipc 15)"
sr --sampler unipc --steps 15 --dtype fp16 --policies resident --compile --warmup-steps 15 \
    --json "$out/solver_unipc_15_compile.json" | tee "$out/solver_unipc_15_compile.log" | head -6

echo "== 6. batched throughput (full size, fp16, unipc 15 steps, LR 64 px)"
"$py" benchmarks/bench_sr.py --throughput --device cuda --dtype fp16 --vae-fp32 \
    --sampler unipc --steps 15 --lr-size 64 --images 16 --batch-sizes 1 4 8 --repeats 2 \
    | tee "$out/throughput.log"

if [ "$quick" != 1 ]; then
    echo "== 7. FA-VAE decode sweep and bench_unet"
    "$py" benchmarks/bench_fa_vae.py --sweep 32 64 96 128 160 192 256 --device cuda --repeats 3 \
        | tee "$out/fa_vae_sweep.log"
fi
"$py" benchmarks/bench_unet.py --device cuda --dtype float16 --repeats 10 | tee "$out/bench_unet_fp16.log"
