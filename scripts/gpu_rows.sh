#!/usr/bin/env bash
# The GPU rows of docs/scale.md, docs/memory.md and docs/benchmarks.md, in one go on a CUDA machine.
#
#   scripts/gpu_rows.sh small    # ~125M model: tok/s and MFU compiled; CUDA peak against the plan per
#                                # optimizer and recompute mode (eager); bf16 vs FP8 GEMMs. One 80 GB GPU.
#   scripts/gpu_rows.sh c        # preset C (5B, offload) with the GPU capped at 24 GiB
#   scripts/gpu_rows.sh a        # preset A (7B) capped at 96 GiB: needs a GPU with more than 96 GiB
#   scripts/gpu_rows.sh perf     # ~125M model compiled, one run after another in one session: dense bf16,
#                                # ternary (float product), the exact int8 product, int8 + FP8 input
#                                # gradient, the fp8 recipe under its measured size rule and on every GEMM,
#                                # mHC (compiled block by block); then one table against dense with compile
#                                # seconds. The CUDA tests of these paths first, and bench gemm's size rule
#                                # for every preset's GEMMs. Sized for 10 minutes on one H100/H200 (not
#                                # yet timed on one).
#
# Each benchmark's table goes to stdout and its JSON and log to $RESULTS (default gpu_rows/).
# The presets run 4 micro-batches per optimizer step instead of their 26 or 32, so that a few steps
# fit in minutes: their peak memory is that of the real step, and their tok/s is a lower bound (the
# optimizer step is paid every 4 micro-batches instead of every 26 or 32).
set -uo pipefail
RESULTS=${RESULTS:-gpu_rows}
mkdir -p "$RESULTS"
TERNCHAT=${TERNCHAT:-ternchat}

bench() {  # bench NAME ARGS...: one benchmark, its JSON and log under $RESULTS
    local name=$1
    shift
    echo "== $name: ternchat bench $*"
    $TERNCHAT bench "$@" --out "$RESULTS/$name.json" > "$RESULTS/$name.log" 2>&1
    local rc=$?
    if [ $rc -ne 0 ]; then echo "exit $rc"; tail -n 5 "$RESULTS/$name.log"; else grep -v "^step " "$RESULTS/$name.log" | tail -n 12; fi
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"

SMALL=configs/ternary_135m.toml
EAGER="--config $SMALL --set train.compile=false --steps 3 --warmup 2"
case "${1:-small}" in
small)
    bench gemm gemm
    bench scale_135m scale --config $SMALL --steps 10 --warmup 3
    bench plan_muon scale $EAGER
    bench plan_adamw scale $EAGER --set optim.matrix_optimizer=adamw
    bench plan_muon8 scale $EAGER --set optim.use_8bit_optim=true
    bench plan_gum scale $EAGER --set optim.use_galore=true
    bench plan_foam scale $EAGER --set optim.matrix_optimizer=foam
    bench plan_full scale $EAGER --set train.activation_checkpointing=full
    bench plan_selective scale $EAGER --set train.activation_checkpointing=selective
    ;;
c)
    bench scale_c scale --config configs/config_c_dual_epyc_4090.toml --memory-cap 24GiB --steps 1 --warmup 1 \
        --set train.grad_accum=4
    ;;
a)
    bench scale_a scale --config configs/config_a_threadripper_blackwell.toml --memory-cap 96GiB --steps 2 \
        --warmup 1 --set train.grad_accum=4
    ;;
perf)
    python3 -m pytest -q -p no:cacheprovider tests/test_int8_forward.py tests/test_gemm.py -k "cuda or tensor_cores" \
        -rs 2>&1 | tail -n 4
    bench gemm gemm
    RUN="scale --config $SMALL --steps 10 --warmup 3"
    bench dense_bf16 $RUN --set model.quant=none
    bench ternary $RUN
    bench ternary_int8 $RUN --set model.ternary_gemm=int8
    bench ternary_int8_fp8dx $RUN --set model.ternary_gemm=int8_fp8_dx
    bench ternary_fp8_rule $RUN --set fp4.recipe=fp8
    bench ternary_fp8_every_gemm $RUN --set fp4.recipe=fp8 --set fp4.fp8_min_macs=0
    bench ternary_mhc $RUN --set mhc.enabled=true
    ROWS=(dense_bf16 ternary ternary_int8 ternary_int8_fp8dx ternary_fp8_rule ternary_fp8_every_gemm ternary_mhc)
    python3 -c "import sys; from ternchat.bench.scale_bench import compare_scale_runs as c; print(c(sys.argv[1:]))" \
        $(for r in "${ROWS[@]}"; do [ -f "$RESULTS/$r.json" ] && echo "$RESULTS/$r.json"; done)
    ;;
*)
    echo "usage: $0 small|c|a|perf" >&2
    exit 2
    ;;
esac
