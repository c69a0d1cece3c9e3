#!/usr/bin/env bash
# The GPU measurements of `ds-distil bench`, prepared for a CUDA machine.
#
#   benchmarks/gpu_bench.sh [OUT_DIR]            run them; OUT_DIR defaults to $OUT, else bench_gpu/
#   benchmarks/gpu_bench.sh --dry-run [OUT_DIR]  print the commands only (no GPU needed)
#
# Nothing is downloaded: the bench builds its models from the "base" preset with random
# weights, a BERT-base-sized teacher (12 layers x 768, vocabulary 30,522) and a 6-layer
# student of the same width, both with PyTorch SDPA attention (attn_implementation="sdpa":
# the flash / memory-efficient kernels). For each precision (bf16, fp16) and sequence
# length (128, 512) one `ds-distil bench` run measures the training step (median of the
# timed steps, with min-max), a micro-batch sweep (tokens/s per size up to the largest that
# fits, one child process per size), the matmul peaks, the MFU against them and against the
# GPU's data-sheet peak, and the projected wall time of the paper's full run on $GPUS GPUs.
# At length 128 it also times the reference formulation (fp32) for the speed-up.
#
# Writes OUT_DIR/bench_<precision>_seq<len>.json and .txt (the printed table), env.txt (GPU,
# driver, versions) and, when a run failed, failed.txt (the script then exits 1).
#
# Environment: PYTHON (default .venv/bin/python, else python3), GPUS (projection, default 8),
# STEPS (timed steps per measurement, default 20), WAIT_IDLE (seconds to wait for a quiet
# machine before each run, default 60), RUN_TIMEOUT (seconds per run, default 300).
set -euo pipefail

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then
    DRY_RUN=1
    shift
fi
OUT_DIR="${1:-${OUT:-bench_gpu}}"
[[ "$OUT_DIR" == /* ]] || OUT_DIR="$PWD/$OUT_DIR"  # relative to where the script was started
cd "$(dirname "$0")/.."  # the repository root: `python -m ds_distil` imports this checkout
if [[ -n "${PYTHON:-}" ]]; then
    PY="$PYTHON"
elif [[ -x .venv/bin/python ]]; then
    PY=.venv/bin/python
else
    PY=python3
fi
GPUS="${GPUS:-8}"
STEPS="${STEPS:-20}"
WAIT_IDLE="${WAIT_IDLE:-60}"
RUN_TIMEOUT="${RUN_TIMEOUT:-300}"

# (precision, sequence length, micro-batch of the main measurement, sweep, formulations).
# The main micro-batches are the shipped configs' (ds_configs/: 64 at length 128); the same
# tokens per step at 512. The sweeps stop at the first size that runs out of memory.
RUNS=(
    "bf16 128 64 32,64,128,256 both"
    "bf16 512 16 8,16,32,64 ds-distil"
    "fp16 128 64 32,64,128,256 both"
    "fp16 512 16 8,16,32,64 ds-distil"
)

bench_command() {  # precision seq micro sweep formulations json -> the array CMD
    CMD=("$PY" -m ds_distil bench --preset base --precision "$1" --seq-len "$2" --micro-batch "$3"
         --micro-batches "$4" --steps "$STEPS" --warmup 3 --gpus "$GPUS" --wait-idle "$WAIT_IDLE" --json "$6")
    if [[ "$5" == "ds-distil" ]]; then
        CMD+=(--only ds-distil)
    fi
}

if [[ "$DRY_RUN" == 1 ]]; then
    for run in "${RUNS[@]}"; do
        read -r precision seq micro sweep formulations <<<"$run"
        bench_command "$precision" "$seq" "$micro" "$sweep" "$formulations" "$OUT_DIR/bench_${precision}_seq${seq}.json"
        echo "+ $(printf "%q " "${CMD[@]}")"
    done
    exit 0
fi

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_bench.sh: no CUDA GPU visible to $PY (torch.cuda.is_available() is False): run it on a GPU" \
         "machine with a CUDA build of torch, or see --dry-run" >&2
    exit 2
fi
mkdir -p "$OUT_DIR"
rm -f "$OUT_DIR/failed.txt"
{
    nvidia-smi || true
    "$PY" -c "import torch, deepspeed, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda); \
print('deepspeed', deepspeed.__version__, 'transformers', transformers.__version__); \
print('gpu', torch.cuda.get_device_name(0))"
} >"$OUT_DIR/env.txt" 2>&1

for run in "${RUNS[@]}"; do
    read -r precision seq micro sweep formulations <<<"$run"
    name="bench_${precision}_seq${seq}"
    bench_command "$precision" "$seq" "$micro" "$sweep" "$formulations" "$OUT_DIR/$name.json"
    if ! timeout "$RUN_TIMEOUT" "${CMD[@]}" >"$OUT_DIR/$name.txt" 2>"$OUT_DIR/$name.err"; then
        echo "$name: failed (stderr in $OUT_DIR/$name.err)" | tee -a "$OUT_DIR/failed.txt" >&2
        continue
    fi
    cat "$OUT_DIR/$name.txt"
done
[[ ! -f "$OUT_DIR/failed.txt" ]]
