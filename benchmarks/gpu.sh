#!/usr/bin/env bash
# The GPU check: what the CPU figures cannot say, measured on one CUDA GPU in under 8 minutes.
#
#   bash benchmarks/gpu.sh                  # one CUDA GPU: writes benchmarks/results/gpu-cuda.md
#   bash benchmarks/gpu.sh --cpu            # the same sections at small sizes on a CPU (the test suite runs it)
#   bash benchmarks/gpu.sh --out FILE       # write the results elsewhere
#   GPU_CHECK_TIMEOUT_S=N bash benchmarks/gpu.sh   # each section's time limit (default 120, 230, 120 s; --cpu 300)
#
# Sections, each its own processes, each with a time limit; one failing does not stop the others:
#   1. the loss step at V = 151,936 in bf16, from hidden states and the output layer: drgrpo's fused loss,
#      the logits path, and TRL's default head (its Triton chunked log-prob kernel, as GRPOTrainer calls it),
#      time and peak memory (torch.cuda.max_memory_allocated) of forward + backward (benchmarks/fused.py);
#   2. one GRPO step inside TRL at V = 151,936, bf16 model: DrGRPOTrainer fused, DrGRPOTrainer on TRL's head,
#      stock GRPOTrainer; loss forward + backward time and peak memory (benchmarks/trl_step.py);
#   3. DrGRPOTrainer trained on the GPU against the whole-batch gradient computed on the CPU
#      (benchmarks/trl_exact.py; float32 checked to 1e-4, bf16 reported).
# --cpu runs every section and script, with fewer variants (section 2 without DrGRPOTrainer on TRL's head,
# which section 3 runs) and tiny sizes: its figures only say that it works.
# Nothing is downloaded: the models are the project's tiny Llama with random weights, built on the spot.
# Needs torch with CUDA, and drgrpo's trl extra (trl, transformers, accelerate, datasets) in the interpreter:
# PYTHON=/path/to/python (default: .venv/bin/python if present, else python3); the checkout's src/ is used.
# Each section's full output goes to FILE's directory as gpu-<device>-<n>.log. Exit status 1 if any section
# failed (its last lines are in the results), 0 otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."

device=cuda
out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) device=cpu ;;
    --out)
      if [ $# -lt 2 ] || [ -z "$2" ]; then echo "gpu.sh: --out needs a file name" >&2; exit 2; fi
      out="$2"
      shift
      ;;
    -h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "gpu.sh: unknown argument '$1' (expected --cpu, --out FILE or --help)" >&2; exit 2 ;;
  esac
  shift
done
out="${out:-benchmarks/results/gpu-$device.md}"
python="${PYTHON:-}"
if [ -z "$python" ]; then
  if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TRANSFORMERS_VERBOSITY=error
mkdir -p "$(dirname "$out")"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if [ "$device" = cuda ]; then
  # N = 16,384 and 32,768 tokens, H = 1536, V = 151,936 (Qwen2.5-Math-1.5B's H and V)
  loss_args=(--device cuda --dtype bfloat16 --sizes 16384x1536x151936,32768x1536x151936 --reps 5)
  step_args=(--device cuda --dtype bfloat16 --vocab 151936 --hidden 1536 --completions 64 --length 256 --steps 2)
  step_args+=(--variants drgrpo-fused,drgrpo,trl)
  limits=(120 230 120)  # 470 s at most
else
  loss_args=(--device cpu --dtype bfloat16 --sizes 64x32x4096 --reps 1)
  step_args=(--device cpu --dtype bfloat16 --vocab 1024 --hidden 32 --completions 4 --length 8 --steps 2)
  step_args+=(--variants drgrpo-fused,trl)
  limits=(300 300 300)
fi
if [ -n "${GPU_CHECK_TIMEOUT_S:-}" ]; then
  limits=("$GPU_CHECK_TIMEOUT_S" "$GPU_CHECK_TIMEOUT_S" "$GPU_CHECK_TIMEOUT_S")
fi

{
  echo "# GPU check ($device)"
  echo
  echo "$(date -u '+%Y-%m-%d %H:%M UTC'); command: \`bash benchmarks/gpu.sh$([ "$device" = cpu ] && echo ' --cpu')\`;" \
    "python: $python; git $(git rev-parse --short HEAD 2>/dev/null || echo '?')."
  if [ "$device" = cuda ] && command -v nvidia-smi > /dev/null; then
    echo
    echo "GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1)"
  fi
  echo
} > "$out"

failures=0
section=0
# run_section TITLE SECONDS MARKDOWN COMMAND...: run COMMAND under a time limit; append MARKDOWN (which the
# command writes) to the results, or the failure and the last lines of the command's output.
run_section() {
  local title="$1" limit="$2" markdown="$3"
  shift 3
  section=$((section + 1))
  local log="${out%.md}-$section.log" started=$SECONDS status=0
  echo "== [$section/3] $title (limit ${limit} s)"
  timeout --kill-after=10 "$limit" "$@" > "$log" 2>&1 || status=$?
  if [ "$status" = 0 ] && [ -s "$markdown" ]; then
    sed -e 's/^# /## /' "$markdown" >> "$out"
    echo "   done in $((SECONDS - started)) s"
  else
    failures=$((failures + 1))
    local why="exit status $status"
    [ "$status" = 124 ] && why="did not finish within $limit s"
    [ "$status" = 0 ] && why="wrote no results"
    {
      echo "## $title: FAILED ($why)"
      echo
      echo "Command: \`$*\`; full output: \`$log\`. Its last lines:"
      echo
      echo '```text'
      tail -n 25 "$log"
      echo '```'
      echo
    } >> "$out"
    echo "   FAILED ($why): see $log"
  fi
  echo >> "$out"
}

run_section "Loss step: fused vs logits vs TRL's head" "${limits[0]}" "$work/loss.md" \
  "$python" benchmarks/fused.py "${loss_args[@]}" --methods logits,trl-head,drgrpo --out "$work/loss.md"
run_section "One GRPO step inside TRL" "${limits[1]}" "$work/step.md" \
  "$python" benchmarks/trl_step.py "${step_args[@]}" --repeats 1 --out "$work/step.md"
run_section "DrGRPOTrainer against the whole-batch gradient" "${limits[2]}" "$work/exact.md" \
  "$python" benchmarks/trl_exact.py --device "$device" --out "$work/exact.md"

echo
cat "$out"
if [ "$failures" -gt 0 ]; then
  echo "gpu.sh: $failures of 3 sections failed; results in $out" >&2
  exit 1
fi
echo "gpu.sh: all 3 sections done; results in $out"
