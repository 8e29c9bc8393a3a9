#!/usr/bin/env bash
# Train the bundled demo model from scratch: the exact commands that produced assets/demo.
#
#   OUT=assets/demo bash scripts/train_demo.sh    # the committed weights (full recipe)
#   bash scripts/train_demo.sh                    # full recipe into logs/demo/release
#   DEVICE=cuda bash scripts/train_demo.sh        # same recipe on a GPU
#   STEPS_SCALE=0.01 OUT=logs/demo_smoke/release WORK=logs/demo_smoke bash scripts/train_demo.sh
#                                                 # smoke run (every stage shortened)
#
# Environment: DEVICE=cpu|cuda (default cpu), STEPS_SCALE (default 1: multiplies every stage's
# steps), PYTHON (default python), DATA (default data/demo), WORK (scratch: run folders,
# intermediate weights; default logs/demo), OUT (final weights + RESULTS.md; default
# $WORK/release: the committed assets/demo is replaced only when OUT names it), WORKERS
# (DataLoader workers; default 0 on cpu, 4 on cuda), SEED (default 23), START=a..f (resume: skip
# the steps before START, reusing their outputs in WORK), FA_CROPS (training crops whose latents
# the FA decoder learns from; default 256), EVAL_STEPS (sampling steps of the evaluation;
# default: the demo config's).
#
# Steps: (a) write the training photographs (scikit-image, matplotlib, scikit-learn: no
# download) to DATA, 19 for training, 3 held out (coffee, chelsea, rocket); (b) train the demo
# VQ-f4 autoencoder from scratch on the colour photographs (box-codec start, k-means + EMA
# codebook with dead-code restarts; L1 + codebook), then its decoder alone with L1 + the focal
# frequency loss (configs/demo/polish_decoder.yaml: removes the faint 4/8 px pattern; latents
# unchanged); (c) train the 2 stage experts (t in [0,500) then [500,1000), stage 1 initialised
# from stage 0's EMA weights; EWA + EMA), then a second pass of each (resumed); (d) generate
# latents for fixed training crops with the 2 experts (the demo's own sampler) and fine-tune the
# decoder's LR fuse layer on them (identity start; the frequency module keeps its identity start,
# see configs/demo/train_fa_vae.yaml): L1 on the HR crops' own latents (3 batches in 4), L1 + LPIPS
# + the latent-grid loss on the generated ones; (e) export the experts' EMA weights and the FA-VAE
# (float16 safetensors) into OUT;
# (f) the quality checks on the held-out photographs (moe_sr/demo_eval.py) -> OUT/RESULTS.md.
set -euo pipefail

DEVICE=${DEVICE:-cpu}
STEPS_SCALE=${STEPS_SCALE:-1}
PY=${PYTHON:-python}
DATA=${DATA:-data/demo}
WORK=${WORK:-logs/demo}
OUT=${OUT:-$WORK/release}
SEED=${SEED:-23}
START=${START:-a}
FA_CROPS=${FA_CROPS:-256}
EVAL_STEPS=${EVAL_STEPS:-}
case $DEVICE in
  cpu) WORKERS=${WORKERS:-0} ;;
  cuda) WORKERS=${WORKERS:-4} ;;
  *) echo "DEVICE must be cpu or cuda, got '$DEVICE'" >&2; exit 2 ;;
esac
export PYTHON=$PY
LOGDIR=$WORK/logs
AE_BATCHES=4000      # (b) autoencoder batches (Lightning counts 2 steps per batch: 2 optimizers)
DEC_BATCHES=600      # (b) then decoder-only batches with the frequency loss
STAGE_STEPS=6000     # (c) steps per stage expert and pass (2 passes)
FA_BATCHES=3000      # (d) FA fine-tuning batches
scaled() { awk -v n="$1" -v s="$STEPS_SCALE" 'BEGIN { v = int(n * s + 0.5); print (v < 1 ? 1 : v) }'; }
AE_B=$(scaled $AE_BATCHES); DEC_B=$(scaled $DEC_BATCHES); STAGE_S=$(scaled $STAGE_STEPS); FA_B=$(scaled $FA_BATCHES)
WARMUP=$(scaled 200)
COMMON=(lightning.trainer.accelerator="$DEVICE" data.num_workers="$WORKERS")
mkdir -p "$WORK"
TIMES=$WORK/timings.txt
if [ "$START" = a ]; then : > "$TIMES"; fi
stamp() { echo "$1: $(( SECONDS - T0 )) s" | tee -a "$TIMES"; }
todo() { [[ "$1" > "$START" || "$1" == "$START" ]]; }  # step $1 runs?
run_folder() { sed -n 's/^run folder: //p' | tail -n 1; }
echo "demo recipe: DEVICE=$DEVICE STEPS_SCALE=$STEPS_SCALE (autoencoder $AE_B + decoder $DEC_B" \
     "batches, experts 2 x $STAGE_S steps each, FA $FA_B batches on $FA_CROPS crops), work in" \
     "$WORK, weights to $OUT"

# (a) data
if todo a; then
  T0=$SECONDS
  "$PY" -m moe_sr.cli.demo_recipe prepare-data --root "$DATA" --fa-crops "$FA_CROPS"
  stamp "a_data"
fi

# (b) the VQ-f4 autoencoder from scratch (every parameter trains)
if todo b; then
  T0=$SECONDS
  RUN=$("$PY" -m ldm.cli.train --base configs/demo/train_autoencoder.yaml --seed "$SEED" \
    --logdir "$LOGDIR" --name demo_autoencoder "${COMMON[@]}" \
    lightning.trainer.max_steps=$(( 2 * AE_B )) \
    data.train.params.root_or_filelist="$DATA/train/colour.txt" | run_folder)
  [ -n "$RUN" ] || { echo "autoencoder training failed" >&2; exit 1; }
  "$PY" -m moe_sr.cli.demo_recipe export-autoencoder "$RUN/checkpoints/last.ckpt" \
    "$WORK/vq_f4_l1.safetensors"
  # then the decoder alone, with the focal frequency loss (configs/demo/polish_decoder.yaml)
  RUN=$("$PY" -m ldm.cli.train --base configs/demo/train_autoencoder.yaml \
    configs/demo/polish_decoder.yaml --seed "$SEED" --logdir "$LOGDIR" --name demo_decoder \
    "${COMMON[@]}" lightning.trainer.max_steps=$(( 2 * DEC_B )) \
    model.params.ckpt="$WORK/vq_f4_l1.safetensors" \
    data.train.params.root_or_filelist="$DATA/train/colour.txt" | run_folder)
  [ -n "$RUN" ] || { echo "decoder training failed" >&2; exit 1; }
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
  # a second pass of each expert: its run resumed up to 2 x STAGE_S steps (constant rate, EWA at
  # its maximum), then exported again
  for k in 0 1; do
    RUN=$(ls -d "$LOGDIR"/*_train_stage$k | tail -n 1)
    "$PY" -m ldm.cli.train -r "$RUN" "${COMMON[@]}" lightning.trainer.max_steps=$(( 2 * STAGE_S )) \
      | run_folder > /dev/null
    "$PY" -m moe_sr.cli.export_expert "$RUN/checkpoints/last.ckpt" \
      "$WORK/experts/expert_stage$k.safetensors"
  done
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
    --device "$DEVICE"
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

# (e) the release: expert EMA weights + FA-VAE as float16, configs in the safetensors metadata;
# staged next to OUT and renamed into place, so OUT never holds a half-written set
if todo e; then
  T0=$SECONDS
  mkdir -p "$OUT"
  STAGE=$(mktemp -d "$OUT/.staging.XXXXXX")
  trap 'rm -rf "$STAGE"' EXIT
  "$PY" -m moe_sr.cli.demo_recipe release --dtype float16 --out "$STAGE" \
    "$WORK/experts/expert_stage0.safetensors" "$WORK/experts/expert_stage1.safetensors" \
    "$WORK/fa_vae.safetensors"
  for f in "$STAGE"/*.safetensors; do mv -f "$f" "$OUT/"; done
  rm -rf "$STAGE"; trap - EXIT
  stamp "e_export"
fi

# (f) held-out evaluation (exit status 3 of `evaluate` = a target was missed: reported, not fatal)
if todo f; then
  T0=$SECONDS
  set +e
  "$PY" -m moe_sr.cli.demo_recipe evaluate --weights-dir "$OUT" --device "$DEVICE" \
    ${EVAL_STEPS:+--steps "$EVAL_STEPS"} --holdout "$DATA/holdout" --markdown "$WORK/results_table.md" --json "$WORK/results.json" \
    --sr-out "$WORK/holdout_sr"
  status=$?
  set -e
  [ $status -eq 0 ] || [ $status -eq 3 ] || exit $status
  stamp "f_evaluate"
  {
    echo "# Demo model: held-out results"
    echo
    echo "Produced by \`DEVICE=$DEVICE STEPS_SCALE=$STEPS_SCALE FA_CROPS=$FA_CROPS"
    echo "bash scripts/train_demo.sh\` ($(date -u +%Y-%m-%d), seed $SEED): autoencoder $AE_B batches"
    echo "then its decoder $DEC_B batches (frequency loss), experts 2 x $STAGE_S steps each, FA"
    echo "parts $FA_B batches on the latents of $FA_CROPS training crops."
    echo "Held-out photographs (never trained on), LR = MATLAB-bicubic x1/8 of the HR image; 8x SR"
    echo "with the demo model at its default settings (configs/demo/sr8x_demo.yaml). Full images,"
    echo "RGB, no border crop; PSNR / SSIM / LPIPS (AlexNet) / DISTS via ldm.evaluation (pyiqa's"
    echo "definitions, offline weights). \"Autoencoder alone\": HR encoded, quantized and decoded by"
    echo "the base decoder; \"FA-VAE + LR\": the same latents decoded with the LR features. Checks:"
    echo "moe_sr/demo_eval.py (border = outer 16 px; grid peakiness at 4 and 8 px periods; Delta-E ="
    echo "CIEDE2000 after a 4 px Gaussian blur)."
    echo
    cat "$WORK/results_table.md"
    echo
    echo "Wall time per step of the recipe (seconds; $(nproc --all) CPU cores, DEVICE=$DEVICE):"
    echo
    sed 's/^/    /' "$TIMES"
  } > "$OUT/RESULTS.md"
fi
echo "demo weights and RESULTS.md in $OUT/"
