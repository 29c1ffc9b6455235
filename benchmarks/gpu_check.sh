#!/usr/bin/env bash
# The GPU check in one script: the accelerator benchmarks, then the README's main job (the quickstart
# study) on the GPU with experiments/gpu.yaml stacked. Run from the repository root on a machine with a
# CUDA GPU and the suite installed:
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]      # default gpu_check/
#
# Writes OUT_DIR/gpu.txt (device, driver, torch), benchmarks.log (table + last-line JSON), lits_scale.log
# (python -m benchmarks --scale lits --device cuda), volumetric.log (python -m benchmarks --volumetric
# --device cuda: the 3D train step at 128x128x64, sliding-window prediction, 3D crop loading), study.log
# and results.md (the study's table, with its wall time appended). Each part has a time limit
# (BENCH_TIMEOUT, LITS_SCALE_TIMEOUT, VOLUMETRIC_TIMEOUT, STUDY_TIMEOUT seconds) so a slow machine still
# returns what it measured; VOLUMETRIC_BUDGET bounds the 3D train step's matrix inside its limit.
set -uo pipefail
out=${1:-gpu_check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 WANDB_MODE=${WANDB_MODE:-offline}
python=${PYTHON:-python3}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/gpu.txt" 2>&1
"$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" >> "$out/gpu.txt" 2>&1
cat "$out/gpu.txt"

timeout "${BENCH_TIMEOUT:-300}" "$python" -m benchmarks --device cuda --budget "${BENCH_BUDGET:-170}" > "$out/benchmarks.log" 2>&1
echo "benchmarks exit $?"; grep -v -i -E "warn|tip|available|^\s*$" "$out/benchmarks.log" | tail -45

# The epoch's parts at LiTS scale on the GPU (validation_share, augment_batch_vs_sample on the device)
timeout "${LITS_SCALE_TIMEOUT:-150}" "$python" -m benchmarks --scale lits --device cuda > "$out/lits_scale.log" 2>&1
echo "lits-scale benchmark exit $?"; grep -v -i -E "warn|tip|available|^\s*$" "$out/lits_scale.log" | tail -16

# The 3D path on the GPU: train step (fp32, bf16-mixed; peak memory), sliding window per 512x512x100 volume, crops/s
timeout "${VOLUMETRIC_TIMEOUT:-90}" "$python" -m benchmarks --volumetric --device cuda --budget "${VOLUMETRIC_BUDGET:-35}" > "$out/volumetric.log" 2>&1
echo "volumetric benchmark exit $?"; grep -v -i -E "warn|tip|available|^\s*$" "$out/volumetric.log" | tail -24

runs=$(mktemp -d)
start=$(date +%s)
timeout "${STUDY_TIMEOUT:-240}" "$python" -m experiments.commands.cli study experiments/studies/quickstart.yaml \
    --config=experiments/gpu.yaml --trainer.default_root_dir="$runs" > "$out/study.log" 2>&1
status=$?
seconds=$(( $(date +%s) - start ))
echo "study exit $status after $seconds s"
if [ -f "$runs/quickstart_study/results.md" ]; then
    cp "$runs/quickstart_study/results.md" "$out/results.md"
    echo "wall time: $seconds s on $(head -1 "$out/gpu.txt")" >> "$out/results.md"
    cat "$out/results.md"
else
    tail -30 "$out/study.log"
fi
ls "$runs"/quickstart_study 2>/dev/null | head -20
