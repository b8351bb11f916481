#!/usr/bin/env bash
# Everything issue 7 measures on one GPU, in one command (about 10 minutes on an H100):
#
#     bash benchmarks/gpu_suite.sh [LOG_DIR]      # LOG_DIR defaults to $OUT, else runs/gpu_suite
#
# 1. tests/gpu (the model on CUDA equals the CPU; bf16 experts on grouped_mm), then the CPU test
#    suite's unit tests under this machine's torch;
# 2. MoE layer vs dense FFN at D=4096, F=14336, 8 experts top-2, 8k tokens, bf16;
# 3. MFU of the Mixtral-shaped proxy for 1..3 layers, without and with MoE recompute.
# Each step's output is appended to LOG_DIR/<step>.log (four files); a failed step is reported
# and the rest still run.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG_DIR=${1:-${OUT:-runs/gpu_suite}}
mkdir -p "$LOG_DIR"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
status=0

step() {  # step NAME COMMAND...: run, append to NAME.log, print its last lines
    local name=$1; shift
    echo "=== $name: $*" | tee -a "$LOG_DIR/$name.log"
    "$@" >>"$LOG_DIR/$name.log" 2>&1
    local rc=$?
    if [ $rc -ne 0 ]; then
        echo "!!! $name failed (exit $rc), see $LOG_DIR/$name.log"
        status=1
    fi
    tail -n 6 "$LOG_DIR/$name.log"
}

"$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" \
    || { echo "gpu_suite.sh: error: no CUDA GPU visible to $PY; run it on a GPU machine" >&2; exit 2; }
rm -f "$LOG_DIR"/{gpu_tests,unit_tests,moe_layer,mfu}.log
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
step gpu_tests "$PY" -m pytest -q -p no:cacheprovider tests/gpu
step unit_tests "$PY" -m pytest -q -p no:cacheprovider -m "not slow" tests/unit
step moe_layer "$PY" benchmarks/moe_layer.py --device cuda --dtype bf16 --tokens 8192 --hidden 4096 \
    --ffn 14336 --skip-loop --repeats 20
for layers in 1 2 3; do
    step mfu "$PY" benchmarks/mfu.py --layers "$layers"
    step mfu "$PY" benchmarks/mfu.py --layers "$layers" --moe-layer-recompute
done
grep -h "ratio\|MFU" "$LOG_DIR"/*.log
exit $status
