#!/usr/bin/env bash
# The GPU check of issue 19: builds with ONNX Runtime's GPU package, then runs `anyprec bench gpu` (the ILGPU bitplane
# kernel against a float64 reference at b = 2..8 and M = 1, 4, 8, 64; stories260K greedy text against the CPU's;
# GEMV at b = 3..8 against the device's measured copy bandwidth). Prints one markdown table; exits non-zero on any
# mismatch, a missing CUDA device or a failed build.
#
#   scripts/gpu-check.sh          on a machine with an NVIDIA GPU (under 8 minutes warm)
#   scripts/gpu-check.sh --cpu    the same check on ILGPU's CPU accelerator (correctness only; --quick sizes)
#
# Models come from ../shared beside the repository, or $ANYPREC_SHARED.
set -euo pipefail
cd "$(dirname "$0")/.."

accelerator=cuda
extra=()
case "${1:-}" in
  "") ;;
  --cpu) accelerator=cpu; extra=(--quick) ;;
  *) echo "error: unknown argument '$1' (usage: scripts/gpu-check.sh [--cpu])" >&2; exit 2 ;;
esac

model="${ANYPREC_SHARED:-../shared}/models/stories260K/stories260K.bin"
[[ -f "$model" ]] || { echo "error: $model is missing (set ANYPREC_SHARED to the shared models folder)" >&2; exit 2; }

if [[ $accelerator == cuda ]] && dotnet build src/AnyPrecML.Cli -c Release -p:UseOnnxRuntimeGpu=true -nologo -v q; then
  echo "built with Microsoft.ML.OnnxRuntime.Gpu" >&2
else
  [[ $accelerator == cuda ]] && echo "warning: the GPU build (-p:UseOnnxRuntimeGpu=true) failed; building the default (ONNX Runtime on the CPU, bitplane products still on the GPU)" >&2
  dotnet build src/AnyPrecML.Cli -c Release -nologo -v q
fi

# 7 minutes for the check itself: the whole script stays under 8 on a warm machine.
timeout 420 dotnet src/AnyPrecML.Cli/bin/Release/net10.0/anyprec.dll bench gpu --accelerator "$accelerator" --model "$model" "${extra[@]}"
