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
# Results: $OUT/bench_1.3b.json, $OUT/forward_profile.json (where one forward's CUDA time goes:
# attention, matrix products, the rest), $OUT/bench_1.3b_compile.json when RUN_COMPILE=1, $OUT/log.txt.
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
"$PY" -m microverse.tools.inference_bench --size "$SIZE" --presets "$PRESETS" --repeats "$REPEATS" --warmup-steps 2 \
  --draft-batch 8 --cache-dir /tmp/mv_bench -o "$OUT/bench_$SIZE.json"
echo "main run done after $(( $(date +%s) - start )) s"

if [ "$RUN_COMPILE" = 1 ]; then
  "$PY" -m microverse.tools.inference_bench --size "$SIZE" --presets exact --compile --repeats 1 --warmup-steps 2 \
    --cache-dir /tmp/mv_bench -o "$OUT/bench_${SIZE}_compile.json"
  echo "compile run done after $(( $(date +%s) - start )) s"
fi

# One batch-1 forward at the benchmark shape under the profiler (CUDA only, about 30 s): the split of
# the 0.62 s between attention, matrix products and the rest says what `exact` can still gain.
if [ $(( $(date +%s) - start )) -lt 450 ]; then
  "$PY" - "$OUT/forward_profile.json" <<'EOF'
import glob, json, sys
import torch
from diffusers import WanTransformer3DModel
if not torch.cuda.is_available():
    print("forward profile skipped: no CUDA")
    sys.exit(0)
path = sorted(glob.glob("/tmp/mv_bench/wan-*-random/transformer"))[0]
tr = WanTransformer3DModel.from_pretrained(path, torch_dtype=torch.bfloat16).cuda().eval()
g = torch.Generator("cuda").manual_seed(0)
f, h, w = (21, 60, 104) if tr.config.num_layers == 30 else (3, 8, 8)
x = torch.randn(1, tr.config.in_channels, f, h, w, device="cuda", dtype=torch.bfloat16, generator=g)
e = torch.randn(1, 512, tr.config.text_dim, device="cuda", dtype=torch.bfloat16, generator=g)
t = torch.tensor([500], device="cuda")
with torch.inference_mode():
    for _ in range(2):
        tr(x, t, e, return_dict=False)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        tr(x, t, e, return_dict=False)
        torch.cuda.synchronize()
cats = {"attention": 0.0, "matmul": 0.0, "other": 0.0}
kernels = []
for ev in prof.key_averages():
    us = getattr(ev, "self_device_time_total", 0) or getattr(ev, "self_cuda_time_total", 0)
    if us <= 0 or ev.key.startswith("aten::"):
        continue
    n = ev.key.lower()
    cat = ("attention" if any(k in n for k in ("flash", "fmha", "attention", "attn", "sdpa")) else
           "matmul" if any(k in n for k in ("gemm", "xmma", "cutlass", "nvjet", "wgmma", "matmul")) else "other")
    cats[cat] += us / 1e3
    kernels.append((us / 1e3, cat, ev.key[:120], ev.count))
kernels.sort(reverse=True)
json.dump({"ms": cats, "total_ms": sum(cats.values()), "top": kernels[:20]}, open(sys.argv[1], "w"), indent=1)
print("forward profile (ms):", {k: round(v, 1) for k, v in cats.items()})
EOF
fi
echo "gpu_check done after $(( $(date +%s) - start )) s"
