#!/usr/bin/env bash
# Train every stage expert of a stage config in order, then export each one's EMA UNet.
#
#   bash scripts/train_moe.sh [-c CONFIG] [-o OUT_DIR] [-i prev|none|CKPT] [-k KEY_MAP] [-l LOGDIR] [-- key=value ...]
#
#   -c  stage config (default configs/train/sr8x_stage.yaml; its `stages` list sets the count)
#   -o  where the experts go: OUT_DIR/expert_stage<k>.safetensors (default LOGDIR/experts)
#   -i  initialisation: `prev` (default: stage k>0 starts from stage k-1's EMA weights),
#       `none`, or a checkpoint every stage starts from (a shared base, or latent-diffusion's
#       4x SR model.ckpt together with -k ldm_sr4x_to_expert)
#   -l  parent folder of the run folders (default logs)
#   anything after `--` is passed to every stage's training as config overrides.
# Afterwards: moe-sr --weights-dir OUT_DIR ... (or pass the files with --ckpt).
set -euo pipefail

CONFIG=configs/train/sr8x_stage.yaml
OUT=
INIT=prev
KEYMAP=
LOGDIR=logs
PY=${PYTHON:-python}
while getopts "c:o:i:k:l:h" opt; do
  case $opt in
    c) CONFIG=$OPTARG ;;
    o) OUT=$OPTARG ;;
    i) INIT=$OPTARG ;;
    k) KEYMAP=$OPTARG ;;
    l) LOGDIR=$OPTARG ;;
    h) sed -n '2,16p' "$0"; exit 0 ;;
    *) exit 2 ;;
  esac
done
shift $((OPTIND - 1))
OUT=${OUT:-$LOGDIR/experts}
[ "${1:-}" = "--" ] && shift
EXTRA=("$@")

NUM_STAGES=$("$PY" -c "import sys; from ldm.training.run import compose_config; \
cfg = compose_config([sys.argv[1]], sys.argv[2:]); print(len(cfg.stages) - 1)" "$CONFIG" "${EXTRA[@]}")
NAME=$(basename "$CONFIG" .yaml)
mkdir -p "$OUT"
echo "training $NUM_STAGES stages of $CONFIG (init: $INIT)"

PREV=
for ((k = 0; k < NUM_STAGES; k++)); do
  ARGS=(--base "$CONFIG" --logdir "$LOGDIR" --name "${NAME}${k}" "stage=$k")
  if [ "$INIT" = prev ]; then
    [ -n "$PREV" ] && ARGS+=("model.params.init_from.path=$PREV/checkpoints/last.ckpt" \
                             "model.params.init_from.weights=ema")
  elif [ "$INIT" != none ]; then
    ARGS+=("model.params.init_from.path=$INIT")
    [ -n "$KEYMAP" ] && ARGS+=("model.params.init_from.key_map.target=$KEYMAP")
  fi
  RUN=$("$PY" -m ldm.cli.train "${ARGS[@]}" "${EXTRA[@]}" | sed -n 's/^run folder: //p' | tail -n 1)
  if [ -z "$RUN" ]; then echo "stage $k: training failed" >&2; exit 1; fi
  "$PY" -m moe_sr.cli.export_expert "$RUN/checkpoints/last.ckpt" "$OUT/expert_stage$k.safetensors"
  PREV=$RUN
done
echo "experts written to $OUT/"
