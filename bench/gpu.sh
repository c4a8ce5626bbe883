#!/usr/bin/env bash
# disp on an NVIDIA GPU next to PyTorch, on random LLaMA-shaped bf16 models made on that machine.
#
# A GPU machine here has no toolchain and no network, and weights cannot be carried to it, so
# the script has two halves:
#
#   bench/gpu.sh pack [BUNDLE_DIR]   on a build machine: builds `disp` with --features wgpu
#       (release, stripped), and puts it in BUNDLE_DIR (default bench/gpu-bundle) with the
#       PyTorch scripts of bench/, SmolLM2's tokenizer, an evaluation text and the Vulkan
#       loader packages; checks that the gzip-compressed bundle stays under 64 MiB.
#   bench/gpu.sh run [BUNDLE_DIR]    on the GPU machine: makes the models with `disp make-model`
#       (seeded, so both sides see the same weights), then for each shape prints, disp
#       (--device wgpu) next to HF transformers on CUDA: eval tokens/s over 512-token windows,
#       the median search step (seq 512, batch 1; PyTorch: the five-site step of
#       bench/hf_search_step.py) and the peak GPU memory (nvidia-smi, polled every 100 ms,
#       minus what was in use before the run).
#
# Environment: SHAPES (default "llama-1b llama2-7b"), WINDOWS (eval windows, default 8),
# STEPS (search steps, default 6: the median is taken from step 2 on), WORK (where models go,
# default /tmp/disp-gpu), PYTHON (default python3, the one holding torch + transformers).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
mode="${1:-}"
bundle="${2:-$here/gpu-bundle}"

pack() {
    local repo
    repo="$(cd "$here/.." && pwd)"
    mkdir -p "$bundle"
    echo "== building disp with --features wgpu (release)"
    (cd "$repo" && cargo build --release -p disp-cli --features wgpu)
    cp "$repo/target/release/disp" "$bundle/disp"
    strip "$bundle/disp"
    cp "$here"/hf_ppl.py "$here"/hf_search_step.py "$here"/_hf_common.py "$here"/gpu.sh "$bundle/"
    mkdir -p "$bundle/tokenizer"
    cp "$repo"/models/smollm2-135m-instruct/tokenizer.json "$repo"/models/smollm2-135m-instruct/tokenizer_config.json "$bundle/tokenizer/"
    cp "$repo"/data/heldout/persuasion.txt "$bundle/eval.txt"
    echo "== Vulkan loader packages (for a machine without libvulkan)"
    mkdir -p "$bundle/gl" /tmp/disp-apt-lists/partial
    local o=(-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/disp-apt-lists)
    apt-get "${o[@]}" update -qq
    (cd "$bundle/gl" && apt-get "${o[@]}" download -qq libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2)
    local size
    size=$(tar -C "$(dirname "$bundle")" -cf - "$(basename "$bundle")" | gzip -9 | wc -c)
    echo "bundle $bundle: $(du -sh "$bundle" | cut -f1) on disk, $((size / 1024 / 1024)) MiB gzipped"
    if [ "$size" -ge $((64 * 1024 * 1024)) ]; then
        echo "error: the gzipped bundle is $size bytes, over the 64 MiB a GPU machine accepts" >&2
        exit 1
    fi
}

# Runs a command while polling the GPU's used memory every 100 ms; its stdout goes to $1 and
# the peak minus the level before the run (MiB) is printed.
measured() {
    local out="$1"
    shift
    local idle poller peak
    idle=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -n 1)
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >"$out.gpu" 2>/dev/null &
    poller=$!
    if ! "$@" >"$out" 2>"$out.err"; then
        kill "$poller" 2>/dev/null || true
        echo "error: $* failed:" >&2
        tail -n 5 "$out.err" >&2
        return 1
    fi
    kill "$poller" 2>/dev/null || true
    wait "$poller" 2>/dev/null || true
    peak=$(sort -n "$out.gpu" | tail -n 1)
    echo $((peak - idle))
}

json_field() {
    "$PYTHON" -c 'import json,sys; print(json.loads(sys.stdin.read().strip().splitlines()[-1])[sys.argv[1]])' "$1"
}

run() {
    : "${SHAPES:=llama-1b llama2-7b}" "${WINDOWS:=8}" "${STEPS:=6}" "${WORK:=/tmp/disp-gpu}" "${PYTHON:=python3}"
    cd "$bundle"
    if ! ldconfig -p | grep -q libvulkan; then
        for f in gl/*.deb; do dpkg -x "$f" /; done
        ldconfig
    fi
    if [ -f /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json ]; then
        export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
        export __EGL_VENDOR_LIBRARY_FILENAMES=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json
    fi
    export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$PYTHON" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
    mkdir -p "$WORK"
    echo
    echo "| shape | work | disp (wgpu) | PyTorch (CUDA, bf16) | disp / PyTorch |"
    echo "| --- | --- | --- | --- | --- |"
    for shape in $SHAPES; do
        local model="$WORK/$shape"
        [ -d "$model" ] || ./disp make-model --shape "$shape" --dtype bf16 --seed 0 --tokenizer tokenizer --out "$model" >/dev/null
        local r="$WORK/$shape-results"
        mkdir -p "$r"
        local disp_eval_mem torch_eval_mem disp_step_mem torch_step_mem
        disp_eval_mem=$(measured "$r/disp-eval" ./disp --device wgpu eval ppl --model "$model" --text eval.txt --seq-len 512 --max-windows "$WINDOWS" --json)
        torch_eval_mem=$(measured "$r/torch-eval" "$PYTHON" hf_ppl.py "$model" eval.txt --seq-len 512 --max-windows "$WINDOWS" --device cuda --dtype bfloat16 --json)
        disp_step_mem=$(measured "$r/disp-step" ./disp --device wgpu prune --model "$model" --data eval.txt --ratio 0.3 --steps "$STEPS" --seq-len 512 --out "$r/plan.json" --json)
        torch_step_mem=$(measured "$r/torch-step" "$PYTHON" hf_search_step.py --model "$model" --seq-len 512 --steps "$((STEPS - 1))" --device cuda --dtype bfloat16 --json)
        local de te ds ts
        de=$(json_field tokens_per_second <"$r/disp-eval")
        te=$(json_field tokens_per_second <"$r/torch-eval")
        ds=$(json_field median_step_seconds <"$r/disp-step")
        ts=$(json_field median_s <"$r/torch-step")
        ratio() { "$PYTHON" -c "print(f'{$1 / $2:.2f}x')"; }
        echo "| $shape | eval tokens/s (seq 512, $WINDOWS windows) | $(printf %.0f "$de") | $(printf %.0f "$te") | $(ratio "$de" "$te") |"
        echo "| $shape | search step, s (median, seq 512) | $(printf %.3f "$ds") | $(printf %.3f "$ts") | $(ratio "$ts" "$ds") |"
        echo "| $shape | peak GPU memory, eval (MiB) | $disp_eval_mem | $torch_eval_mem | |"
        echo "| $shape | peak GPU memory, search (MiB) | $disp_step_mem | $torch_step_mem | |"
    done
}

case "$mode" in
    pack) pack ;;
    run) run ;;
    *)
        sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'
        exit 2
        ;;
esac
