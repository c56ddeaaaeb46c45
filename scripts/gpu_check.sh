#!/usr/bin/env bash
# The one prepared GPU run of issue 6: `microverse bench` at Wan2.1-T2V-1.3B size (random weights),
# 480x832x81, 50 steps, CFG 5, plain diffusers WanPipeline against the exact and fast presets in one
# process on one card, plus draft mode (256x256x33, 20 steps, batch 8 against batch 1).
#
# Prepare on a machine with PyPI (the device machine has no registry and no diffusers/pydantic):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .gpu_wheels \
#     diffusers==0.42.1 importlib_metadata==10.2.0 pydantic==2.14.4 pydantic_core==2.50.5 \
#     pydantic-settings==2.16.3 annotated-types==0.8.0 typing-inspection==0.4.5 python-dotenv==1.2.4
#   echo .gpu_wheels/ >> .git/info/exclude
# then one device call: run(command="bash scripts/gpu_check.sh", carry=[".gpu_wheels"], timeout_s=600).
# Results: $OUT/bench_1.3b.json (and $OUT/bench_1.3b_compile.json when RUN_COMPILE=1), $OUT/log.txt.
# Dry run on CPU: SIZE=tiny OUT=/tmp/gpu_check bash scripts/gpu_check.sh
set -euo pipefail
OUT=${OUT:-/tmp/gpu_check}
SIZE=${SIZE:-1.3b}
REPEATS=${REPEATS:-1}          # 1 fits one 10-minute call (about 5 min of work); 2 gives medians of two
RUN_COMPILE=${RUN_COMPILE:-0}  # 1: a second run of `exact` with regional torch.compile (about 4 more minutes)
PY=${PY:-python3}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
start=$(date +%s)

if ! "$PY" -c "import diffusers, pydantic_settings" 2>/dev/null; then
  test -d .gpu_wheels || { echo "diffusers/pydantic-settings missing and no .gpu_wheels carried"; exit 2; }
  "$PY" -m pip install -q --no-index --no-deps --target /tmp/mv_deps .gpu_wheels/*.whl
  export PYTHONPATH="/tmp/mv_deps:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
"$PY" - <<'EOF'
import torch, diffusers, transformers
print("torch", torch.__version__, "diffusers", diffusers.__version__, "transformers", transformers.__version__)
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(), torch.cuda.get_device_capability())
EOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv || true

# fast: the default knobs (40 % of the steps with UniPC, CFG on the first 60 %, first-block cache 0.08),
# and a more aggressive variant (30 % of the steps, CFG on the first half, cache 0.12).
PRESETS="exact,fast,fast@fast_step_ratio=0.3:fast_cfg_cutoff=0.5:fast_cache_threshold=0.12"
"$PY" -m microverse.bench --size "$SIZE" --presets "$PRESETS" --repeats "$REPEATS" --warmup-steps 2 \
  --draft-batch 8 --cache-dir /tmp/mv_bench -o "$OUT/bench_$SIZE.json"
echo "main run done after $(( $(date +%s) - start )) s"

if [ "$RUN_COMPILE" = 1 ]; then
  "$PY" -m microverse.bench --size "$SIZE" --presets exact --compile --repeats 1 --warmup-steps 2 \
    --cache-dir /tmp/mv_bench -o "$OUT/bench_${SIZE}_compile.json"
  echo "compile run done after $(( $(date +%s) - start )) s"
fi
