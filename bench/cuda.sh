#!/usr/bin/env bash
# The README's CUDA figures in one go, on a machine with an NVIDIA GPU (not a test):
#
#   DIFFUSION_DATA_ROOT=DIR bash bench/cuda.sh [OUT_DIR] [SECONDS]
#
# In order of importance, each step cut short if the whole would pass SECONDS (default 600): the default
# run (5 epochs), its 16-digit grid and 1000 digits, its scorecard, bench/speed.py (eager and compiled),
# the default run again with --compile, 10 epochs of the default model and the README's larger GPU preset
# for 2.5 minutes (--minutes), each of the last two with a scorecard and a one-row-per-digit grid. Writes log.txt and the pictures to
# OUT_DIR (default cuda_out). The scorecard needs the classifier (python -m diffusion.classifier).
set -u
OUT=${1:-cuda_out}
BUDGET=${2:-600}
mkdir -p "$OUT"
WORK=$(mktemp -d)
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=30  # a progress line every 30 s keeps the log readable
TIMEFORMAT='-- %R s wall'

step() {  # step LIMIT_S COMMAND...: run it, cut at LIMIT_S or at what is left of the budget
  local left=$((BUDGET - SECONDS))
  local limit=$(( $1 < left ? $1 : left ))
  shift
  if ((limit < 5)); then echo "-- skipped (budget spent): $*"; return; fi
  echo; echo "== $* (limit ${limit} s)"
  time timeout "$limit" "$@"
  local rc=$?
  ((rc)) && echo "-- exit $rc"
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())"
  echo "CPU cores: $(nproc)"

  step 120 python -m diffusion.main --ckpt-dir "$WORK/default"
  step 60 python -m diffusion.sampling --ckpt-dir "$WORK/default" --output "$OUT/generated_images.png"
  step 60 python -m diffusion.sampling --ckpt-dir "$WORK/default" --num-images 1000 --output "$WORK/1000.png"
  step 60 python -m diffusion.sampling --ckpt-dir "$WORK/default" --num-images 1000 --output "$WORK/1000.png"
  step 90 python -m diffusion.evaluate --ckpt-dir "$WORK/default" --n 1000

  step 200 python bench/speed.py --data-root "$DIFFUSION_DATA_ROOT" --compile --steps 50
  step 60 python bench/speed.py --data-root "$DIFFUSION_DATA_ROOT" --batch 1024 --steps 20 --only "ours: default (2x2 patches, 32/32 at 14/7; --amp/--memory-format auto)"

  step 150 python -m diffusion.main --compile --ckpt-dir "$WORK/compiled"

  step 210 python -m diffusion.main --epochs 10 --ckpt-dir "$WORK/e10"
  step 90 python -m diffusion.evaluate --ckpt-dir "$WORK/e10" --n 1000
  step 60 python -m diffusion.sampling --ckpt-dir "$WORK/e10" --all-digits --num-images 10 --output "$OUT/epochs10_all_digits.png"

  preset=(--patch-size 1 --base-channels 64 --channel-mults 1 2 2 --num-res-blocks 2 --batch-size 256)
  step 200 python -m diffusion.main "${preset[@]}" --minutes 2.5 --ckpt-dir "$WORK/preset"
  step 90 python -m diffusion.evaluate --ckpt-dir "$WORK/preset" --n 1000
  step 60 python -m diffusion.sampling --ckpt-dir "$WORK/preset" --all-digits --num-images 10 --output "$OUT/preset_all_digits.png"
  step 90 python -m pytest -q tests/test_distributed.py -k cuda
  echo; echo "== done after $SECONDS s"
} 2>&1 | tee "$OUT/log.txt"
