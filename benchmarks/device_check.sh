#!/usr/bin/env bash
# One device check for a lent GPU machine (issues 12, 15, 17): card, GPU tests, profile, GPU benchmarks.
#
# Run from the repository root on the device machine, e.g. through the device tool:
#   run(command="bash benchmarks/device_check.sh", carry=[".whl"], timeout_s=590)
# Every step has its own timeout and the whole script a wall budget (DEVICE_CHECK_BUDGET seconds,
# default 540); a failing or timed-out step is recorded and the next one runs. Everything lands in
# $OUT (at most 8 files come back from the device tool, no deeper than 2 folders):
#   summary.txt       card, one line per step (PASS / FAIL rc / TIMEOUT / SKIP why, seconds), targets
#   device_check.log  every step's output
#   all.tar.gz        every step's output folder (refreshed after each step, so a kill keeps it)
#   profile_gpu.{json,md}, gpu_torch_paths.json, device_protocol_[trt_]<gpu>_<date>.{json,md} (when those steps ran)
#
# Environment:
#   DRY_RUN=1            print the steps and their commands, run nothing
#   ONLY="a b"           run only these steps (names as printed by DRY_RUN=1; include setup on a fresh machine)
#   PYTHON=python3       interpreter (the device machine's has torch and Triton)
#   DEVICE_CHECK_BUDGET  wall-clock seconds for all steps (default 540)
#   DEVICE_CHECK_MIN_STEP  fewest seconds worth starting a step with (default 20)
#   OUT                  output folder (set by the device tool; default /tmp/gsnet-device-check)
#   TRT_MODEL_SIZE       model the trt_protocol step exports and builds (default paper; tiny for a quick run)
# Installs nothing but the small pure-Python wheels carried in .whl/ (open_clip_torch, ftfy, wcwidth:
# see benchmarks/README.md), into /tmp/site. Never changes the GPU's settings.
set -u

OUT=${OUT:-/tmp/gsnet-device-check}
PYTHON=${PYTHON:-python3}
BUDGET=${DEVICE_CHECK_BUDGET:-540}
DRY_RUN=${DRY_RUN:-0}
ONLY=${ONLY:-}
WORK=${DEVICE_CHECK_WORK:-/tmp/gsnet-device-check-work}
MIN_STEP=${DEVICE_CHECK_MIN_STEP:-20}  # a step is not started with fewer seconds left
START=$(date +%s)
SUMMARY=$OUT/summary.txt
LOG=$OUT/device_check.log
FAILED=0
RESULTS=()

export PYTHONUNBUFFERED=1 PYTHON OUT WORK
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}

elapsed() { echo $(( $(date +%s) - START )); }

# step NAME TIMEOUT_S COMMAND: run COMMAND (a bash string, in the repo root, with $STEP_OUT its folder)
wanted() { [[ -z $ONLY || " $ONLY " == *" $1 "* ]]; }

# skip NAME WHY: record a step that cannot run here
skip() { wanted "$1" && RESULTS+=("$(printf '%-16s SKIP (%s)' "$1" "$2")"); return 0; }

step() {
    local name=$1 limit=$2 cmd=$3
    wanted "$name" || return 0
    if [[ $DRY_RUN == 1 ]]; then
        printf 'step %-16s timeout %4ss: %s\n' "$name" "$limit" "$cmd"
        return 0
    fi
    local left=$(( BUDGET - $(elapsed) - 5 ))  # 5 s kept for the summary
    if (( left < MIN_STEP )); then
        skip "$name" "wall budget spent"
        FAILED=1
        return 0
    fi
    (( limit > left )) && limit=$left
    local dir=$WORK/$name t0 rc status
    mkdir -p "$dir"
    t0=$(date +%s)
    echo "=== [$(date -u +%H:%M:%S)] step $name (timeout ${limit}s): $cmd" | tee -a "$LOG"
    STEP_OUT=$dir timeout --kill-after=10 "$limit" bash -c "$cmd" >>"$LOG" 2>&1 </dev/null
    rc=$?
    case $rc in
        0) status=PASS ;;
        124 | 137) status="TIMEOUT after ${limit}s" ;;
        *) status="FAIL rc=$rc" ;;
    esac
    [[ $rc != 0 ]] && FAILED=1
    RESULTS+=("$(printf '%-16s %-22s %4ss' "$name" "$status" $(( $(date +%s) - t0 )))")
    echo "=== step $name: $status" | tee -a "$LOG"
    tar -czf "$OUT/all.tar.gz" -C "$WORK" . 2>/dev/null
    write_summary
}

# has_option SCRIPT OPTION: does SCRIPT's --help mention OPTION?
has_option() { [[ -f $1 ]] && timeout 60 "$PYTHON" "$1" --help 2>/dev/null | grep -q -- "$2"; }

write_summary() {
    {
        echo "gsnet-deploy device check, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
        [[ -f $WORK/card/card.txt ]] && cat "$WORK/card/card.txt"
        echo
        printf '%s\n' "${RESULTS[@]}"
        [[ -f $WORK/targets/targets.txt ]] && { echo; cat "$WORK/targets/targets.txt"; }
        echo "wall: $(elapsed)s of ${BUDGET}s"
    } >"$SUMMARY"
}

if [[ $DRY_RUN != 1 ]]; then
    mkdir -p "$OUT" "$WORK"
    : >"$LOG"
fi

# --- (a) the card: read-only queries, no settings touched
step card 60 '{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit,temperature.gpu,utilization.gpu --format=csv;
  "$PYTHON" -c "import torch, platform; print(\"torch\", torch.__version__, \"CUDA\", torch.version.cuda, \"cuDNN\", torch.backends.cudnn.version(), \"Python\", platform.python_version()); print(\"GPU\", torch.cuda.get_device_name(), torch.cuda.get_device_capability())";
  "$PYTHON" -c "import triton; print(\"triton\", triton.__version__)"; } | tee "$STEP_OUT/card.txt"; test "${PIPESTATUS[0]}" = 0'

# --- the project's few missing pure-Python packages, from carried wheels (nothing downloaded)
step setup 120 'if ls .whl/*.whl >/dev/null 2>&1; then "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1; else echo "no .whl/ carried: relying on what is installed"; fi;
  "$PYTHON" -c "import gsnet_deploy.model.torch_backend, gsnet_deploy.bench.timers; print(\"imports ok\")"'

# --- (b) correctness: tests/gpu, the kernel tests (Triton interpreter) and any test marked for CUDA
step tests 150 'files="tests/gpu tests/kernels $(grep -rlE "mark\.gpu|requires_cuda" tests --include="test_*.py" 2>/dev/null | grep -vE "^tests/(gpu|kernels)/" | sort -u | tr "\n" " ")";
  "$PYTHON" -m pytest -q -p no:cacheprovider -m "not slow" $files --junitxml "$STEP_OUT/junit.xml"'

# --- (c) where the time goes (issue 17 item 1)
step profile 200 '"$PYTHON" benchmarks/profile_gpu.py --device cuda --classes 6 40 --iters 20 --out "$STEP_OUT" && cp "$STEP_OUT"/profile_gpu.json "$STEP_OUT"/profile_gpu.md "$OUT"/'

# --- (d) the GPU benchmarks: torch paths side by side (targets of issues 12 and 17)
step torch_paths 240 '"$PYTHON" benchmarks/gpu_torch_paths.py --classes 6 40 --iters 15 --out "$STEP_OUT" && cp "$STEP_OUT"/gpu_torch_paths.json "$OUT"/'

# paper protocol per image on the GPU (issue 15), when the script exists
if [[ -f benchmarks/device_protocol_gpu.py ]]; then
    step protocol 180 '"$PYTHON" benchmarks/device_protocol_gpu.py --classes 6 40 --iters 30 --folder 20 --out "$STEP_OUT" && cp "$STEP_OUT"/device_protocol_*.json "$STEP_OUT"/device_protocol_*.md "$OUT"/'
else
    skip protocol "benchmarks/device_protocol_gpu.py does not exist"
fi

# a folder of same-size images, K of them per device call (issue 12 item 4): torch fp16, fused kernel, CUDA graphs,
# paper model, N=6 and 40, --batch-images 1 4 8 side by side (24 images: whole groups of 4 and 8); report in all.tar.gz
step batch_images 200 '"$PYTHON" benchmarks/latency.py --model-size paper --backend torch --variant "fused kernel, CUDA graphs" --classes 6 40 --iters 5 --no-tiled --no-chart --folder 24 --batch-images 1 4 8 --out "$STEP_OUT"'

# the same on TensorRT engines (text, image, paper encoder + head; exported and built in the step), when
# TensorRT is installed: TRT_MODEL_SIZE=tiny for a quick first run (the paper-size build takes minutes)
if [[ $DRY_RUN == 1 ]] || { wanted trt_protocol && timeout 60 "$PYTHON" -c "import tensorrt; tensorrt.Builder" >/dev/null 2>&1; }; then
    step trt_protocol 420 '"$PYTHON" benchmarks/device_protocol_gpu.py --backend tensorrt --model-size "${TRT_MODEL_SIZE:-paper}" --classes 5 40 --iters 30 --folder 20 --out "$STEP_OUT" && cp "$STEP_OUT"/device_protocol_trt_*.json "$STEP_OUT"/device_protocol_trt_*.md "$OUT"/'
else
    skip trt_protocol "TensorRT is not installed here"
fi

# the fused cost-volume kernel against the plain ops and torch.compile (issue 17 item 3)
step kernel_bench 120 '"$PYTHON" benchmarks/kernel_cost_volume.py --out "$STEP_OUT"'

# tiled mode: numpy blending on the host vs blending on the GPU, same run (issue 12 item 3)
step tiled_blend 120 '"$PYTHON" benchmarks/tiled_blend.py --model-size paper --device cuda --classes 5 40 --out "$STEP_OUT/tiled_blend_gpu"'  # in all.tar.gz

# re-query (encode once, decode per vocabulary) on the GPU, N=5 and N=40 (issue 15 item 3)
step requery 150 'for n in 5 40; do "$PYTHON" benchmarks/requery.py --model-size paper --device cuda --fp16 --classes $n --out "$STEP_OUT/requery_gpu_n$n" || exit 1; done'

# --- the numbers against the targets (issues 12, 15, 17); reads what the steps wrote
if [[ $DRY_RUN != 1 ]]; then
    cat >"$WORK/targets.py" <<'PY'
import json
import sys
from pathlib import Path

work = Path(sys.argv[1])
goals = {6: 9.0, 40: 13.0}  # image graph ms on an H100/H200 (issue 17 item 5)
rows = []


def load(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def verdict(ok):
    return "MET" if ok else "NOT MET"


for run in (load(work / "profile" / "profile_gpu.json") or {}).get("runs", []):
    ms, goal = run.get("graph", {}).get("median_ms"), goals.get(run["classes"])
    if ms is not None and goal is not None:
        rows.append(f"profile     N={run['classes']:<3} graph {ms:7.2f} ms   target <= {goal} ms  {verdict(ms <= goal)}")
for key, runs in (load(work / "torch_paths" / "gpu_torch_paths.json") or {}).get("runs", {}).items():
    entry, goal = runs.get("ours fp16 kernel + CUDA graphs", {}), goals.get(int(key.split("=")[1]))
    if "median_ms" in entry and goal is not None:
        ms = entry["median_ms"]
        rows.append(f"torch_paths {key:<5} graph {ms:7.2f} ms   target <= {goal} ms  {verdict(ms <= goal)}")
    if "rel_l2_vs_fp32" in entry:
        err = entry["rel_l2_vs_fp32"]
        rows.append(f"torch_paths {key:<5} fp16 rel. L2 vs fp32 {err:.1e}  target <= 1e-2  {verdict(err <= 1e-2)}")
for path in sorted((work / "batch_images").glob("latency_*.json")):  # issue 12 item 4: no target, K side by side
    for name, variant in (load(path) or {}).get("variants", {}).items():
        for key, entry in variant.get("paper", {}).items():
            one = entry.get("folder", {}).get("device")
            for k, run in sorted(entry.get("folder", {}).get("batched", {}).items(), key=lambda item: int(item[0])):
                if one and run.get("per_image_ms"):
                    rows.append(f"batch_images {key:<5} K={k}: {1e3 / run['per_image_ms']:7.1f} images/s, K=1 "
                                f"{1e3 / one['per_image_ms']:7.1f} images/s ({one['per_image_ms'] / run['per_image_ms']:.2f}x)")
print("targets (issue 17 item 5; the paper protocol per image within 2 ms of the graph: see the protocol step):")
print("\n".join(rows) if rows else "no numbers: the profile and torch_paths steps wrote nothing")
PY
fi
step targets 30 '"$PYTHON" "$WORK/targets.py" "$WORK" | tee "$STEP_OUT/targets.txt"; test "${PIPESTATUS[0]}" = 0'

if [[ $DRY_RUN == 1 ]]; then
    printf '%s\n' "${RESULTS[@]}"
    exit 0
fi
write_summary
echo
cat "$SUMMARY"
exit $FAILED
