#!/usr/bin/env bash
# Train the bundled demo model (assets/demo) from scratch: the exact commands that produced it.
#
#   STEPS_SCALE=0.3 LATENT_STEPS=20 EVAL_STEPS=25 bash scripts/train_demo.sh   # the committed weights
#                                                 # (~35 min on a shared 2-core CPU)
#   bash scripts/train_demo.sh                    # full recipe (~2 h on 2 CPU cores)
#   DEVICE=cuda bash scripts/train_demo.sh        # same recipe on a GPU (minutes)
#   STEPS_SCALE=0.01 OUT=logs/demo_smoke bash scripts/train_demo.sh   # smoke run (every stage shortened)
#
# Environment: DEVICE=cpu|cuda (default cpu), STEPS_SCALE (default 1: multiplies every stage's
# steps), PYTHON (default python), DATA (default data/demo), WORK (scratch: run folders,
# intermediate weights; default logs/demo), OUT (final weights + RESULTS.md; default assets/demo),
# WORKERS (DataLoader workers; default 0 on cpu, 4 on cuda), SEED (default 23), LATENT_STEPS /
# EVAL_STEPS (DDIM steps of the FA latents / the evaluation; default 20 / 50), START=a..f (resume:
# skip the steps before START, reusing their outputs in WORK).
#
# Steps: (a) write scikit-image's bundled photographs to DATA (16 train, 3 held out: coffee,
# chelsea, rocket); (b) train the demo VQ-f4 autoencoder (32 ch) from scratch, L1 + codebook;
# (c) train the 2 stage experts (t in [0,500) then [500,1000), stage 1 initialised from stage 0's
# EMA weights, EWA + EMA); (d) generate latents for fixed training crops with the 2 experts and
# fine-tune the FA parts of the decoder (fuse layer + frequency module) on them; (e) export the
# experts' EMA weights and the FA-VAE as our safetensors into OUT; (f) PSNR / SSIM on the held-out
# photographs: demo model vs bicubic (and the FA-VAE reconstruction) -> OUT/RESULTS.md.
set -euo pipefail

DEVICE=${DEVICE:-cpu}
STEPS_SCALE=${STEPS_SCALE:-1}
PY=${PYTHON:-python}
DATA=${DATA:-data/demo}
WORK=${WORK:-logs/demo}
OUT=${OUT:-assets/demo}
SEED=${SEED:-23}
START=${START:-a}
case $DEVICE in
  cpu) WORKERS=${WORKERS:-0} ;;
  cuda) WORKERS=${WORKERS:-4} ;;
  *) echo "DEVICE must be cpu or cuda, got '$DEVICE'" >&2; exit 2 ;;
esac
export PYTHON=$PY
LOGDIR=$WORK/logs
AE_BATCHES=4000      # (b) autoencoder batches (Lightning counts 2 steps per batch: 2 optimizers)
STAGE_STEPS=4000     # (c) steps per stage expert
FA_BATCHES=1000      # (d) FA fine-tuning batches
LATENT_STEPS=${LATENT_STEPS:-20}  # (d) DDIM steps of the generated latents
EVAL_STEPS=${EVAL_STEPS:-50}      # (f) DDIM steps of the evaluation (the demo default)
scaled() { awk -v n="$1" -v s="$STEPS_SCALE" 'BEGIN { v = int(n * s + 0.5); print (v < 1 ? 1 : v) }'; }
AE_B=$(scaled $AE_BATCHES); STAGE_S=$(scaled $STAGE_STEPS); FA_B=$(scaled $FA_BATCHES)
WARMUP=$(scaled 100)
COMMON=(lightning.trainer.accelerator="$DEVICE" data.num_workers="$WORKERS")
mkdir -p "$WORK" "$OUT"
TIMES=$WORK/timings.txt
TABLE=$WORK/results_table.md
if [ "$START" = a ]; then : > "$TIMES"; fi
stamp() { echo "$1: $(( SECONDS - T0 )) s" | tee -a "$TIMES"; }
todo() { [[ "$1" > "$START" || "$1" == "$START" ]]; }  # step $1 runs?
run_folder() { sed -n 's/^run folder: //p' | tail -n 1; }
echo "demo recipe: DEVICE=$DEVICE STEPS_SCALE=$STEPS_SCALE (autoencoder $AE_B batches, experts" \
     "$STAGE_S steps each, FA $FA_B batches), work in $WORK, weights to $OUT"

# (a) data
if todo a; then
  T0=$SECONDS
  "$PY" -m moe_sr.cli.demo_recipe prepare-data --root "$DATA"
  stamp "a_data"
fi

# (b) the VQ-f4 autoencoder from scratch (every parameter trains)
if todo b; then
  T0=$SECONDS
  RUN=$("$PY" -m ldm.cli.train --base configs/demo/train_autoencoder.yaml --seed "$SEED" \
    --logdir "$LOGDIR" --name demo_autoencoder "${COMMON[@]}" \
    lightning.trainer.max_steps=$(( 2 * AE_B )) \
    data.train.params.root_or_filelist="$DATA/train/epoch.txt" | run_folder)
  [ -n "$RUN" ] || { echo "autoencoder training failed" >&2; exit 1; }
  "$PY" -m moe_sr.cli.demo_recipe export-autoencoder "$RUN/checkpoints/last.ckpt" \
    "$WORK/vq_f4.safetensors"
  stamp "b_autoencoder"
fi

# (c) the stage experts, in order (stage 1 starts from stage 0's EMA weights)
if todo c; then
  T0=$SECONDS
  bash scripts/train_moe.sh -c configs/demo/train_stage.yaml -o "$WORK/experts" -l "$LOGDIR" -- \
    "${COMMON[@]}" model.params.first_stage="$WORK/vq_f4.safetensors" \
    lightning.trainer.max_steps="$STAGE_S" model.params.ewa.ramp_steps="$STAGE_S" \
    model.params.lr_warmup_steps="$WARMUP" data.train.params.root_or_filelist="$DATA/train/epoch.txt"
  stamp "c_experts"
fi

# (d) latents of the 2 experts for fixed training crops, then fine-tune the FA parts on them
if todo d; then
  T0=$SECONDS
  rm -rf "$WORK/stage_c" && mkdir -p "$WORK/stage_c"
  cp "$WORK"/experts/expert_stage*.safetensors "$WORK/stage_c/"
  "$PY" -m moe_sr.cli.demo_recipe init-fa-vae "$WORK/vq_f4.safetensors" \
    "$WORK/stage_c/fa_vae_init.safetensors"
  "$PY" -m moe_sr.cli.sr -i "$DATA/fa_crops/lr" -o "$WORK/fa_latents" --overwrite --quiet \
    --config configs/demo/sr8x_demo.yaml --weights-dir "$WORK/stage_c" --save-latents \
    --steps "$LATENT_STEPS" --device "$DEVICE"
  RUN=$("$PY" -m ldm.cli.train --base configs/demo/train_fa_vae.yaml --seed "$SEED" \
    --logdir "$LOGDIR" --name demo_fa_vae "${COMMON[@]}" \
    lightning.trainer.max_steps=$(( 2 * FA_B )) \
    model.params.ckpt="$WORK/vq_f4.safetensors" \
    data.train.params.latent_dir="$WORK/fa_latents/latents" \
    data.train.params.dataset.params.lr_dir="$DATA/fa_crops/lr" \
    data.train.params.dataset.params.hr_dir="$DATA/fa_crops/hr" | run_folder)
  [ -n "$RUN" ] || { echo "FA-VAE fine-tuning failed" >&2; exit 1; }
  "$PY" -m moe_sr.cli.demo_recipe export-autoencoder "$RUN/checkpoints/last.ckpt" \
    "$WORK/fa_vae.safetensors"
  stamp "d_fa_vae"
fi

# (e) the release: expert EMA weights + FA-VAE, configs in the safetensors metadata
if todo e; then
  T0=$SECONDS
  rm -f "$OUT"/*.safetensors
  cp "$WORK/experts/expert_stage0.safetensors" "$WORK/experts/expert_stage1.safetensors" \
    "$WORK/fa_vae.safetensors" "$OUT/"
  stamp "e_export"
fi

# (f) held-out evaluation
if todo f; then
  T0=$SECONDS
  "$PY" -m moe_sr.cli.demo_recipe evaluate --weights-dir "$OUT" --device "$DEVICE" \
    --steps "$EVAL_STEPS" \
    --holdout "$DATA/holdout" --markdown "$TABLE" --json "$WORK/results.json" \
    --sr-out "$WORK/holdout_sr"
  stamp "f_evaluate"
fi
{
  echo "# Demo model: held-out results"
  echo
  echo "Produced by \`DEVICE=$DEVICE STEPS_SCALE=$STEPS_SCALE LATENT_STEPS=$LATENT_STEPS EVAL_STEPS=$EVAL_STEPS"
  echo "bash scripts/train_demo.sh\` (autoencoder $AE_B batches, experts $STAGE_S steps each, FA $FA_B"
  echo "batches on the latents of $(ls "$DATA/fa_crops/lr" | wc -l) training crops)"
  echo "($(date -u +%Y-%m-%d), seed $SEED). Held-out scikit-image photographs (never trained on),"
  echo "LR = MATLAB-bicubic x1/8 of the HR image; 8x SR with the demo model (2 stage experts,"
  echo "DDIM eta 1, seed 42, AdaIN colour fix). PSNR (dB) / SSIM on RGB, full image, no border"
  echo "crop, pyiqa (ldm.evaluation). The last column encodes the HR image and decodes its quantised"
  echo "latent with the FA-VAE (LR features fused, no colour fix): how well the small autoencoder"
  echo "itself reproduces the photo. A working example of the method, not a claim of quality."
  echo
  cat "$TABLE"
  echo
  echo "Wall time per step of the recipe (seconds):"
  echo
  sed 's/^/    /' "$TIMES"
} > "$OUT/RESULTS.md"
echo "demo weights and RESULTS.md in $OUT/"
