#!/usr/bin/env bash
# The GPU speedrun of docs/quality.md in steps that suit a rented GPU without rustc: train and generate
# there, score where rustc is.
#
#   scripts/gpu_speedrun.sh train DATA RESULTS [--set SECTION.KEY=VALUE ...]   # GPU: pretrain, SFT, model file
#   scripts/gpu_speedrun.sh generate RESULTS PROBLEMS                          # GPU: the completions to score
#   scripts/gpu_speedrun.sh pack RESULTS DIR     # DIR: the model file in 15 MiB parts + results.tar.gz
#   scripts/gpu_speedrun.sh score RESULTS|DIR PROBLEMS                         # where rustc is: the table rows
#
# DATA: a folder made by `ternchat data --export DIR`, or DIR packed with `tar -cJf DIR.tar.xz DIR`
# (source-code tokens compress about 4x, so an archive moves a corpus where a folder would not).
# `train` runs configs/speedrun_gpu.toml; further arguments go to `ternchat speedrun`, e.g.
# `--set train.time_limit_min=4` or `--set model.quant=none`. `generate` samples rust_basics and
# PROBLEMS (e.g. humaneval-rs.jsonl) greedily and at n=10 (T=0.8, top-p 0.95) from the packed SFT model
# and from the pretrained one. `pack` makes at most 8 files for transfers that limit their number and
# size; `score` rejoins and checks them.
set -euo pipefail
TERNCHAT=${TERNCHAT:-ternchat}
step=${1:?usage: $0 train|generate|pack|score ...}
shift

generate() {  # MODEL PROBLEMS NAME: greedy and n=10 completions into $results/completions/NAME.*
    local model=$1 problems=$2 name=$3
    $TERNCHAT eval humaneval-rust --run "$model" --problems "$problems" --generate-only --batch-size 32 \
        --out "$results/completions/$name.greedy"
    $TERNCHAT eval humaneval-rust --run "$model" --problems "$problems" --generate-only --batch-size 64 \
        --samples 10 --temperature 0.8 --top-p 0.95 --out "$results/completions/$name.n10"
}

case "$step" in
train)
    data=${1:?usage: $0 train DATA RESULTS [--set ...]}; results=${2:?usage: $0 train DATA RESULTS}; shift 2
    mkdir -p "$results"
    if [[ "$data" == *.tar.xz ]]; then
        unpacked=$(mktemp -d)
        tar -xJf "$data" -C "$unpacked"
        data=$(find "$unpacked" -name manifest.json -printf '%h\n' | head -n 1)
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
    run_dir="$results/run"
    start=$(date +%s)
    $TERNCHAT speedrun --config configs/speedrun_gpu.toml --data "$data" --run-dir "$run_dir" "$@" 2>&1 \
        | tee "$results/speedrun.log" | grep -v "^step \|it/s\|step/s"
    echo "speedrun: $(( $(date +%s) - start )) s"
    ;;
generate)
    results=${1:?usage: $0 generate RESULTS PROBLEMS}; problems=${2:?usage: $0 generate RESULTS PROBLEMS}
    for stage in run_sft run; do
        [ -f "$results/$stage/model_packed.safetensors" ] || \
            $TERNCHAT export --run "$results/$stage" --format packed >/dev/null
    done
    for stage in run_sft run; do
        for set in rust_basics "$problems"; do
            generate "$results/$stage/model_packed.safetensors" "$set" "$stage.$(basename "${set%.*}")"
        done
    done
    ;;
pack)
    results=${1:?usage: $0 pack RESULTS DIR}; dir=${2:?usage: $0 pack RESULTS DIR}
    mkdir -p "$dir"
    model="$results/run_sft/model_packed.safetensors"
    split -b 15M "$model" "$dir/model.part_"
    sha256sum "$model" | cut -d' ' -f1 > "$results/model.sha256"
    tar -czf "$dir/results.tar.gz" -C "$results" --exclude='*.safetensors' --exclude='checkpoints' \
        --exclude='step_*' .
    ls -l "$dir"
    ;;
score)
    results=${1:?usage: $0 score RESULTS PROBLEMS}; problems=${2:?usage: $0 score RESULTS PROBLEMS}
    if [ -f "$results/results.tar.gz" ]; then
        tar -xzf "$results/results.tar.gz" -C "$results"
        cat "$results"/model.part_* > "$results/model_sft.safetensors"
        [ "$(sha256sum "$results/model_sft.safetensors" | cut -d' ' -f1)" = "$(cat "$results/model.sha256")" ] \
            || { echo "the rejoined model file does not match model.sha256" >&2; exit 1; }
    fi
    for made in "$results"/completions/*/completions.jsonl; do
        name=$(basename "$(dirname "$made")")
        case "$name" in *rust_basics*) set=rust_basics ;; *) set=$problems ;; esac
        case "$name" in *.n10) k=1,10 ;; *) k=1 ;; esac
        $TERNCHAT eval humaneval-rust --completions "$made" --problems "$set" --k "$k" \
            --out "$results/scores/$name" | tail -n 1
    done
    ;;
*)
    echo "usage: $0 train|generate|pack|score ..." >&2; exit 2
    ;;
esac
