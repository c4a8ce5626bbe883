#!/usr/bin/env bash
# Peak memory and time of disp on big bf16 checkpoints, on this machine's CPU (issue 13's bars).
#
#   bench/scale.sh [WORK_DIR]
#
# Makes seeded random LLaMA-shaped bf16 folders with `disp make-model` (the 1.17 B shape and
# LLaMA-2-7B: 32 layers, d 4096, d_ff 11008, 32 heads; 13.5 GB), then runs, each under
# /usr/bin/time -v: `eval ppl` on one 512-token window, `prune` for 2 search steps at seq 512,
# `export` in both formats and `eval ppl` of each export. Prints one markdown row per run: peak
# RSS (GB), wall time, and for the 1.17 B eval its ratio to the safetensors size. Needs ~45 GB of
# free disk in WORK_DIR (default /tmp/disp-scale; removed at the end unless KEEP=1) and
# models/smollm2-135m-instruct (its tokenizer), data/ (`cargo xtask fetch-assets`).
# Environment: DISP (the binary; default: build target/release/disp), SHAPES (default
# "llama-1b llama2-7b").
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-/tmp/disp-scale}"
: "${SHAPES:=llama-1b llama2-7b}" "${KEEP:=0}"
if [[ -z "${DISP:-}" ]]; then
    (cd "$repo" && cargo build --release -q -p disp-cli)
    DISP="$repo/target/release/disp"
fi
text="$repo/data/heldout/persuasion.txt"
calib="$repo/data/calib/austen-emma.txt"
for f in "$text" "$calib" "$repo/models/smollm2-135m-instruct/tokenizer.json"; do
    [[ -f "$f" ]] || { echo "bench/scale.sh: $f is missing (run cargo xtask fetch-assets)" >&2; exit 1; }
done
mkdir -p "$work"

# measure LABEL CMD...: runs CMD under /usr/bin/time -v, prints "| LABEL | GB | m:ss |".
measure() {
    local label="$1"; shift
    local log="$work/time.log"
    if ! /usr/bin/time -v "$@" > "$work/out.log" 2> "$log"; then
        echo "bench/scale.sh: $label failed:" >&2
        tail -n 5 "$log" >&2
        exit 1
    fi
    local kb wall
    kb="$(awk -F': ' '/Maximum resident set size/ {print $2}' "$log")"
    wall="$(awk -F': ' '/Elapsed \(wall clock\)/ {print $2}' "$log")"
    LAST_GB="$(awk -v kb="$kb" 'BEGIN { printf "%.2f", kb * 1024 / 1e9 }')"
    echo "| $label | $LAST_GB | $wall |"
}

echo "| run | peak RSS (GB) | wall (h:mm:ss or m:ss) |"
echo "| --- | ---: | ---: |"
for shape in $SHAPES; do
    model="$work/$shape"
    rm -rf "$model" "$work/$shape.plan.json" "$work/$shape.pruned" "$work/$shape.dense-eq"
    measure "$shape: make-model (bf16)" "$DISP" make-model --shape "$shape" --dtype bf16 --seed 0 \
        --tokenizer "$repo/models/smollm2-135m-instruct" --out "$model"
    file_gb="$(du -sb "$model" | awk '{ printf "%.2f", $1 / 1e9 }')"
    eval_args=(--text "$text" --seq-len 512 --max-windows 1 --json)
    measure "$shape: eval ppl, 1 window of 512 (folder $file_gb GB)" "$DISP" eval ppl --model "$model" "${eval_args[@]}"
    echo "|   ratio of peak RSS to the folder | $(awk -v a="$LAST_GB" -v b="$file_gb" 'BEGIN { printf "%.2f×", a / b }') | |"
    if [[ "$shape" == "llama-1b" ]]; then
        continue
    fi
    measure "$shape: prune, 2 search steps at seq 512" "$DISP" prune --model "$model" --ratio 0.3 \
        --data "$calib" --steps 2 --seq-len 512 --out "$work/$shape.plan.json"
    measure "$shape: export (pruned)" "$DISP" export --model "$model" --plan "$work/$shape.plan.json" --out "$work/$shape.pruned"
    measure "$shape: export (dense-equivalent)" "$DISP" export --model "$model" --plan "$work/$shape.plan.json" \
        --format dense-equivalent --out "$work/$shape.dense-eq"
    rm -rf "$model"
    measure "$shape: eval ppl of the pruned export" "$DISP" eval ppl --model "$work/$shape.pruned" "${eval_args[@]}"
    measure "$shape: eval ppl of the dense-equivalent export" "$DISP" eval ppl --model "$work/$shape.dense-eq" "${eval_args[@]}"
done
if [[ "$KEEP" != 1 ]]; then
    rm -rf "$work"
fi
