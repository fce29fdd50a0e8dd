#!/usr/bin/env bash
# The codec and train-step benchmarks on one GPU, float32 and bfloat16, in under 8 minutes.
#
#   bash bench/gpu.sh            # from the repository root, on a machine with one CUDA GPU
#
# Needs jax with CUDA, torch with CUDA, and this project's Python dependencies. A machine
# without network (this workplace's device machines) installs them from wheels carried in
# .gpu_wheels/, made beforehand on a machine with network:
#   pip download -d .gpu_wheels --only-binary=:all: --python-version 3.12 --no-deps \
#       diffusers pydantic pydantic-core annotated-types typing-inspection tensorboardX
# Prints each figure with its target, the chip's name, MFU against its datasheet peak and the
# ratio against torch on the same GPU; the last lines are the benchmarks' JSON.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ -d .gpu_wheels ]; then
  "$PYTHON" -m pip install --quiet --no-index --find-links .gpu_wheels --no-deps .gpu_wheels/*.whl
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # share the card with torch in the same process

gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
# dense datasheet peaks, TFLOP/s: bfloat16 tensor cores, float32 without tf32
case "$gpu" in
  *H100*|*H200*|*GH200*) bf16_peak=989; fp32_peak=67 ;;
  *A100*) bf16_peak=312; fp32_peak=19.5 ;;
  *L4*) bf16_peak=121; fp32_peak=30 ;;
  *) bf16_peak=0; fp32_peak=0 ;;  # unknown chip: MFU not printed
esac
echo "GPU: $gpu (datasheet peaks: bf16 $bf16_peak, fp32 $fp32_peak TFLOP/s)"

run() { timeout "$1" "$PYTHON" "${@:2}"; }
run 150 bench/codec.py --size 512 --batches 1,8 --dtype float32 --tiled-size 4096 --peak-tflops "$fp32_peak"
run 150 bench/codec.py --size 512 --batches 1,8 --dtype bfloat16 --tiled-size 0 --peak-tflops "$bf16_peak"
run 200 bench/train_step.py --size 256 --batch 8 --dtypes float32,bfloat16 --peak-tflops "$bf16_peak"
