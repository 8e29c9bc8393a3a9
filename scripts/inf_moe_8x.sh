#!/usr/bin/env bash
# 8x super-resolution with the four SS-MoE experts and the FA-VAE: the interface of the
# release's sr_8x_inf/inf_moe_8x.sh, rewritten to call `python -m moe_sr` (no torchrun, no
# process group, no PYTHONPATH). Every setting can be changed through the environment, e.g.
#   INPUT_PATH=my_lr/ OUTPUT_PATH=out/ DEVICE=cuda DTYPE=fp16 bash scripts/inf_moe_8x.sh
# Extra arguments are passed on to the CLI (see `python -m moe_sr --help`), e.g. --offload.
# The released files: python -c 'from moe_sr.hub import download_release; download_release("models")'
set -euo pipefail

CONFIG_PATH="${CONFIG_PATH:-configs/moe_sr/sr8x.yaml}"
CKPT_DIR="${CKPT_DIR:-models/Unet}"
CKPT_PATH="${CKPT_PATH:-$CKPT_DIR/moe_stage0.ckpt $CKPT_DIR/moe_stage1.ckpt $CKPT_DIR/moe_stage2.ckpt $CKPT_DIR/moe_stage3.ckpt}"
DECODER_CONFIG="${DECODER_CONFIG:-}"                  # empty: the FA-VAE of CONFIG_PATH
DECODER_CKPT="${DECODER_CKPT:-models/first_stage_models/vq-f4/fa_vae.pth}"
WEIGHTS_DIR="${WEIGHTS_DIR:-}"                        # a folder of our safetensors instead
INPUT_PATH="${INPUT_PATH:-assets/examples/lr}"
OUTPUT_PATH="${OUTPUT_PATH:-outputs/sr8x}"
SAMPLE_STEPS="${SAMPLE_STEPS:-200}"
ETA="${ETA:-1.0}"
COLOR_FIX="${COLOR_FIX:-adain}"                       # adain | wavelet | none
SEED="${SEED:-42}"
DEVICE="${DEVICE:-}"                                  # empty: cuda if available, else cpu
DTYPE="${DTYPE:-fp32}"                                # fp32 | fp16 | bf16
PYTHON="${PYTHON:-}"                                  # empty: the active or the repo's venv

if [[ -z "$PYTHON" ]]; then  # works without an activated virtualenv
  repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  if [[ -n "${VIRTUAL_ENV:-}" ]]; then PYTHON="$VIRTUAL_ENV/bin/python"
  elif [[ -x "$repo/.venv/bin/python" ]]; then PYTHON="$repo/.venv/bin/python"
  else PYTHON=python3
  fi
fi
if ! "$PYTHON" -c "import moe_sr.cli.sr" >/dev/null 2>&1; then
  echo "inf_moe_8x.sh: $PYTHON cannot import moe_sr (and torch): run 'make install' and" \
       "'. .venv/bin/activate', or set PYTHON=/path/to/venv/bin/python" >&2
  exit 2
fi

args=(--config "$CONFIG_PATH" -i "$INPUT_PATH" -o "$OUTPUT_PATH"
      --steps "$SAMPLE_STEPS" --eta "$ETA" --color-fix "$COLOR_FIX" --seed "$SEED" --dtype "$DTYPE")
if [[ -n "$WEIGHTS_DIR" ]]; then
  args+=(--weights-dir "$WEIGHTS_DIR")
else
  # shellcheck disable=SC2206  # CKPT_PATH is a space-separated list, as in the release
  ckpts=($CKPT_PATH)
  args+=(--ckpt "${ckpts[@]}" --vae-ckpt "$DECODER_CKPT")
fi
[[ -n "$DECODER_CONFIG" ]] && args+=(--vae-config "$DECODER_CONFIG")
[[ -n "$DEVICE" ]] && args+=(--device "$DEVICE")

exec "$PYTHON" -m moe_sr "${args[@]}" "$@"
