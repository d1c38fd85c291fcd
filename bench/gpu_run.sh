#!/usr/bin/env bash
# The GPU benchmark in one command, for a bare machine image: Python 3.12 with its own torch,
# transformers, timm, accelerate, safetensors and pillow, and no network. `make gpu-wheels` (run
# where a package registry answers) puts the missing wheels (diffusers, pydantic, ...) under
# .whl/; this script installs them into a target folder, puts the source tree on the path (no
# `pip install` of the project: its torch pin does not apply there), and runs
#
#   1. bench/gpu.py on full-size random SD 1.5 at 512 px, 20 DDIM steps: reference vs optimised
#      at B = 1 and the largest B, ablations, a profiler table of the top kernels,
#   2. the digits semantic tests on the GPU in fp32 and in bf16,
#   3. bench/gpu.py on full-size random SDXL at 1024 px (fewer timed iterations),
#   4. the torch.compile ablation (SD 1.5) in its own process, with whatever time is left,
#
# writing JSON figures, profiler tables and a log under OUT_DIR, and prints a short table last.
#
#   bench/gpu_run.sh OUT_DIR            # on the GPU machine
#   bench/gpu_run.sh OUT_DIR --smoke    # on a CPU: the same steps at toy sizes (make gpu-smoke)
#
# Environment: PYTHON (default python3), DIGIN_GPU_SITE (the wheels' target folder, default
# /tmp/digin-site), DIGIN_GPU_BUDGET_S (seconds for the whole run, default 400; the compile step
# gets what is left), DIGIN_GPU_WHEELS (default .whl under the source tree), DIGIN_GPU_STEPS (the
# steps to run, default "sd15 digits sdxl compile"; "digits-bf16" runs the bf16 digits tests
# first), DIGIN_GPU_SD15_ARGS / DIGIN_GPU_SDXL_ARGS (bench/gpu.py arguments instead of these).
set -uo pipefail

OUT=${1:?usage: bench/gpu_run.sh OUT_DIR [--smoke]}
MODE=${2:-}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
SITE=${DIGIN_GPU_SITE:-/tmp/digin-site}
BUDGET=${DIGIN_GPU_BUDGET_S:-400}
WHEELS=${DIGIN_GPU_WHEELS:-$ROOT/.whl}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
exec > >(tee -a "$OUT/log.txt") 2>&1
START=$SECONDS
stamp() { echo "== [$((SECONDS - START)) s] $*"; }

stamp "install the carried wheels into $SITE"
shopt -s nullglob
wheels=("$WHEELS"/*.whl)
if [ ${#wheels[@]} -eq 0 ]; then
    echo "no wheels under $WHEELS: run 'make gpu-wheels' where a package registry answers" >&2
    exit 2
fi
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "${wheels[@]}" || exit 2
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
cd "$ROOT" || exit 2

stamp "environment"
"$PYTHON" - <<'EOF' || exit 2
import importlib, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
for name in ("diffusers", "transformers", "timm", "accelerate", "safetensors", "pydantic",
             "huggingface_hub", "numpy", "PIL", "sklearn"):
    module = importlib.import_module(name)
    print(f"  {name} {getattr(module, '__version__', '?')} ({module.__file__})")
import digin.core.flops, digin.core.jobs, digin.core.random_models  # everything the run imports
EOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,memory.used,utilization.gpu,clocks.sm,temperature.gpu --format=csv

STEPS=${DIGIN_GPU_STEPS:-sd15 digits sdxl compile}
if [ "$MODE" = "--smoke" ]; then
    DEVICE=cpu
    SD15=(--smoke --device cpu --archs sd15)
    SDXL=(--smoke --device cpu --archs sdxl --configs reference optimised --no-profile)
    COMPILE=()
    DIGITS_K=(-k "guided")
else  # sized from the H200 runs' row times to end near 7 minutes there (BENCHMARKS.md)
    DEVICE=cuda
    SD15=(--archs sd15 --configs reference optimised optimised+channels_last --iterations 2
          --ablations-large optimised+channels_last --limit 32 --limit-reference 8
          --profile-batch 8)
    SDXL=(--archs sdxl --configs reference optimised --iterations 2 --limit 4
          --limit-reference 1 --no-profile)
    COMPILE=(--archs sd15 --configs optimised+compile --no-profile)
    DIGITS_K=()
fi
# DIGIN_GPU_SD15_ARGS / DIGIN_GPU_SDXL_ARGS replace the bench/gpu.py arguments above
[ -n "${DIGIN_GPU_SD15_ARGS:-}" ] && read -r -a SD15 <<< "$DIGIN_GPU_SD15_ARGS"
[ -n "${DIGIN_GPU_SDXL_ARGS:-}" ] && read -r -a SDXL <<< "$DIGIN_GPU_SDXL_ARGS"
has() { [[ " $STEPS " == *" $1 "* ]]; }
status=0
reports=()

digits() {  # $1: the precision; the result line goes to digits.txt
    stamp "digits semantic tests on $DEVICE in $1"
    local log
    log=$(DIGIN_TEST_DEVICE=$DEVICE DIGIN_TEST_PRECISION=$1 "$PYTHON" -m pytest -q \
        -p no:cacheprovider tests/core/test_digits_semantic.py "${DIGITS_K[@]}" 2>&1)
    local rc=$?
    echo "$log" | tail -3
    { echo "$log"; echo "-- $1 above, exit $rc"; } >> "$OUT/digits.txt"
    return $rc
}
: > "$OUT/digits.txt"
if has digits-bf16; then digits bf16 || status=1; fi

if has sd15; then
    stamp "SD 1.5 speed and memory (bench/gpu.py)"
    "$PYTHON" bench/gpu.py "${SD15[@]}" --out "$OUT/gpu_sd15.json" || status=1
    reports+=("$OUT/gpu_sd15.json")
fi

if has digits; then  # both precisions at once: the digits models leave the GPU mostly idle
    digits fp32 > "$OUT/digits_fp32.log" 2>&1 &
    digits bf16 || status=1
    wait $! || status=1
    cat "$OUT/digits_fp32.log" && rm -f "$OUT/digits_fp32.log"
fi

if has sdxl; then
    stamp "SDXL speed and memory (bench/gpu.py)"
    "$PYTHON" bench/gpu.py "${SDXL[@]}" --out "$OUT/gpu_sdxl.json" || status=1
    reports+=("$OUT/gpu_sdxl.json")
fi

if has compile && [ ${#COMPILE[@]} -gt 0 ]; then
    left=$((BUDGET - (SECONDS - START) - 15))
    if [ "$left" -ge 60 ]; then
        stamp "torch.compile ablation, at most $left s"
        timeout --signal=KILL "$left" "$PYTHON" bench/gpu.py "${COMPILE[@]}" \
            --out "$OUT/compile.json" || echo "compile ablation: did not finish within $left s"
        reports+=("$OUT/compile.json")
    else
        echo "compile ablation skipped: $left s left of the ${BUDGET} s budget"
    fi
fi

stamp "done"
echo "digits semantic tests:"
grep -E "passed|failed|error|^-- " "$OUT/digits.txt" | sed 's/^/  /'
[ ${#reports[@]} -gt 0 ] && "$PYTHON" bench/gpu.py --report "${reports[@]}"
exit $status
