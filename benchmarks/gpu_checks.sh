#!/usr/bin/env bash
# Every GPU figure the benchmarks print, in priority order, each under its own time limit and all inside one
# deadline (a lent GPU's time is short). Logs go to $OUT (default gpu-logs/). Carried wheels in .whl/ are installed
# first when present (the device image has torch but not open_clip, diffusers, taming or kornia; .whl/ is git-ignored,
# so name it in the device run's carry). Fetch them with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl open_clip_torch==3.3.0 diffusers==0.42.1 kornia==0.9.0 \
#       kornia_rs==0.2.0 ftfy==6.3.1 wcwidth importlib_metadata taming-transformers-rom1504==0.0.6 omegaconf==2.4.0
#
#   bash benchmarks/gpu_checks.sh [SECONDS]          # default deadline 530 s; checks past it are skipped
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-logs}
mkdir -p "$OUT"
deadline=$((SECONDS + ${1:-530}))
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda)"

check() {  # NAME LIMIT COMMAND...: run under min(LIMIT, time left), log to $OUT/NAME.log, print the figures
    local name=$1 limit=$2 left=$((deadline - SECONDS))
    shift 2
    [ "$left" -lt 20 ] && { echo "== $name: skipped (deadline)"; return; }
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name ($limit s max)"
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    # warnings are dropped, except CUDA graphs' (a compiled guidance step that cannot replay its graphs says so)
    awk 'tolower($0) ~ /cudagraph/ || (tolower($0) !~ /warn|randomly initialised/ && $0 !~ /^[[:space:]]*$/)' \
        "$OUT/$name.log" | tail -n 16
    echo "   [$name: rc $rc, $((SECONDS - start)) s]"
}

check diffusion  240 python3 benchmarks/diffusion_step.py --steps 10 --compile --only b --profile
check train-b32c 110 python3 benchmarks/train_throughput.py --model ViT-B-32 --batch-size 256 --precision bf16 --steps 20 --compile
check train-b32cc 140 python3 benchmarks/train_throughput.py --model ViT-B-32 --batch-size 256 --precision bf16 --steps 20 --compile --compile-theirs
check train-b32   90 python3 benchmarks/train_throughput.py --model ViT-B-32 --batch-size 256 --precision bf16 --steps 20 --profile
check paths       60 python3 benchmarks/cuda_paths.py
check vqgan      100 python3 benchmarks/vqgan_step.py --steps 10 --compile
check train-tiny  30 python3 benchmarks/train_throughput.py --model shapes-tiny --batch-size 256 --precision bf16 --steps 20
check guide      120 python3 benchmarks/guide_step.py --steps 20 --compile
check diffusion-a 60 python3 benchmarks/diffusion_step.py --steps 10 --compile --only a
