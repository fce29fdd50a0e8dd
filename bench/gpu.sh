#!/usr/bin/env bash
# The codec benchmark in float32 and bfloat16, the train-step benchmark in bfloat16 and a profile
# of the step by kernel kind on one GPU, in about 10 minutes.
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
# dense datasheet peaks, TFLOP/s: bfloat16 and TF32 tensor cores (XLA's default precision runs a
# float32 convolution or matrix product on the GPU in TF32, and so does torch's cuDNN)
case "$gpu" in
  *H100*|*H200*|*GH200*) bf16_peak=989; fp32_peak=495 ;;
  *A100*) bf16_peak=312; fp32_peak=156 ;;
  *L4*) bf16_peak=121; fp32_peak=60 ;;
  *) bf16_peak=0; fp32_peak=0 ;;  # unknown chip: MFU not printed
esac
echo "GPU: $gpu (datasheet peaks: bf16 $bf16_peak, fp32 $fp32_peak TFLOP/s)"

# a part that fails or runs past its limit is reported and the next one still runs
run() { timeout "$1" "$PYTHON" "${@:2}" || echo "gpu.sh: ${2} exited with status $? (124: past its $1 s)"; }
run 150 bench/codec.py --size 512 --batches 1,8 --dtype float32 --tiled-size 4096 --peak-tflops "$fp32_peak"
run 150 bench/codec.py --size 512 --batches 1,8 --dtype bfloat16 --tiled-size 0 --peak-tflops "$bf16_peak"
# bfloat16 alone: the dtype a GPU trains in (each G+D step compiles in about 70 s on an H200)
run 240 bench/train_step.py --size 256 --batch 8 --dtypes bfloat16 --peak-tflops "$bf16_peak"
# where the step's GPU time goes: kernel time by kind (cuDNN convolutions, fusions, ...) and the
# share of the wall time the GPU ran kernels
run 150 bench/op_profile.py --step --size 256 --batch 8 --dtype bfloat16 --top 15
