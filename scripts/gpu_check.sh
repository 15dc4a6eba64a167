#!/usr/bin/env bash
# The prepared GPU check (docs/benchmarks.md, "GPU check"): bf16 extraction on a CUDA actor pool with MFU, 1-GPU
# DeepSpeed ZeRO-2 and ZeRO-3 training steps of a ~1.1B model with peak memory, generation throughput of every
# installed backend. One line of figures per part (GPU_CHECK ...). Sized for under 8 minutes on one H100 (not yet timed on one).
#   scripts/gpu_check.sh                 # on a GPU machine, in the project's environment
#   scripts/gpu_check.sh --cpu           # toy sizes on CPU: checks the script itself (the test suite runs this)
#   scripts/gpu_check.sh --help          # every option
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
exec python -m raysafe.cli bench gpu "$@"
