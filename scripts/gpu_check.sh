#!/usr/bin/env bash
# The GPU check in one command: the card and versions, the benchmark (W1-W7 against HF transformers, see
# docs/BENCHMARKS.md) with a profile of nanotune's steps, and the tests that need a GPU.
#
#   bash scripts/gpu_check.sh OUT_DIR            # on one H100 / H200: under 10 minutes, each step time-limited
#   bash scripts/gpu_check.sh OUT_DIR --cpu      # the same steps on CPU with tiny shapes: a check of this script
#
# Every step writes into OUT_DIR as it goes and has its own time limit, so a step that runs out of time leaves the
# others' results (the benchmark writes its JSON lines as each run finishes). Small models run before the 8B ones.
# OUT_DIR gets: env.txt, bench.log, bench_small.jsonl, bench_8b.jsonl, top_ops.txt (the profiles' top GPU ops per
# workload), traces.tar.gz (Chrome traces), tests.log, bench_moe.jsonl. QLoRA (W4) needs bitsandbytes and the HF +
# Liger rows need liger-kernel; install them first where they are missing.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bash scripts/gpu_check.sh OUT_DIR [--cpu]}
MODE=${2:-gpu}
PY=${PYTHON:-python3}
PROFILES=$(mktemp -d)  # one trace and one table per workload; packed into OUT at the end
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

step() {  # step NAME LIMIT_S LOG COMMAND...: run with a time limit, log to OUT/LOG, print the log's tail
    local name=$1 limit=$2 log=$3 start rc
    shift 3
    start=$(date +%s)
    echo "=== $name (limit ${limit} s): $*" | tee -a "$OUT/$log"
    timeout --kill-after=10 "$limit" "$@" >>"$OUT/$log" 2>&1
    rc=$?
    echo "=== $name: exit $rc after $(($(date +%s) - start)) s$([ $rc = 124 ] && echo ' (time limit)')" | tee -a "$OUT/$log"
    tail -n 30 "$OUT/$log" | grep -v '^===' || true
}

if [ "$MODE" = "--cpu" ]; then
    BENCH=($PY scripts/bench.py --device cpu --tiny --no-liger)
    SMALL=W7 LARGE=W3 LIMIT_SMALL=300 LIMIT_LARGE=300
else
    BENCH=($PY scripts/bench.py --steps 5 --warmup 2)
    SMALL=W1,W2,W5,W6,W7 LARGE=W3,W4 LIMIT_SMALL=270 LIMIT_LARGE=110
fi

{
    date -u +"date: %Y-%m-%dT%H:%M:%SZ"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null \
        || echo "nvidia-smi: not available"
    $PY - <<'EOF'
import importlib, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| cuDNN", torch.backends.cudnn.version() if torch.cuda.is_available() else None)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, "| capability", f"{p.major}.{p.minor}", "| SMs", p.multi_processor_count,
          "| memory", f"{p.total_memory / 2**30:.1f} GiB")
for name in ("triton", "transformers", "peft", "bitsandbytes", "liger_kernel", "safetensors", "tokenizers"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as e:  # a package that is missing or fails to import (bitsandbytes without its library)
        print(name, "missing:", type(e).__name__, str(e).splitlines()[0][:120] if str(e) else "")
EOF
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

step "benchmark, small models ($SMALL)" "$LIMIT_SMALL" bench.log \
    "${BENCH[@]}" --workloads "$SMALL" --out "$OUT/bench_small.jsonl" --profile "$PROFILES"
step "benchmark, 8B models ($LARGE)" "$LIMIT_LARGE" bench.log \
    "${BENCH[@]}" --workloads "$LARGE" --out "$OUT/bench_8b.jsonl" --profile "$PROFILES"

for table in "$PROFILES"/*.txt; do
    [ -e "$table" ] && { echo "## $(basename "$table" .txt)"; cat "$table"; echo; }
done >"$OUT/top_ops.txt"
tar -czf "$OUT/traces.tar.gz" -C "$PROFILES" . 2>/dev/null
rm -rf "$PROFILES"

if [ "$MODE" = "--cpu" ]; then
    step "tests marked cuda (skip on CPU)" 300 tests.log $PY -m pytest -m cuda tests/test_gpu.py -rs
else
    step "tests that need a GPU" 150 tests.log $PY -m pytest -m cuda tests/ -rs -q
    step "Triton kernels and losses compiled for the GPU" 50 tests.log \
        $PY -m pytest tests/test_kernels.py tests/test_loss.py -q
    step "MoE glue: PyTorch against Triton, one W6 layer's experts" 60 bench.log \
        $PY scripts/bench_moe.py --out "$OUT/bench_moe.jsonl"
fi
echo "=== done: results in $OUT"
