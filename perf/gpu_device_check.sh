#!/usr/bin/env bash
# One command for a GPU machine: install the carried wheels, run the GPU proof and the GPU tests, within 7 minutes,
# writing at most 6 files to one folder.
#
#   bash perf/gpu_device_check.sh [--out DIR] [--only SECTION...] [--merge [REPORT_JSON]] [--no-tests]
#                                 [--tests-only] [--cpu-dry-run]
#
#   --out DIR          where the files go (default: $OUT when set, else perf/results/device_check)
#   --only SECTION...  rerun these proof sections only (passed to perf/gpu_proof.py), no tests unless --tests;
#                      the report keeps the other sections of the earlier one (--merge; see below)
#   --merge [FILE]     merge into FILE (e.g. a committed perf/results/gpu_<device>.json; a fresh device machine's
#                      output folder starts empty), default the report already in --out
#   --tests            with --only: run the GPU tests too
#   --no-tests         the proof only          --tests-only   the tests only
#   --cpu-dry-run      the same flow on a machine without a GPU: the proof's CPU dry run, the tests on CPU (checks
#                      this script's plumbing; not GPU evidence)
#
# Variables: PYTHON  the interpreter, used for everything (default python3; exported, so launch/ scripts use it too)
#            WHEELS  carried wheels (default perf/wheels; from perf/gpu_wheels.sh), installed --no-index --no-deps
#            TESTS   the pytest selection (default: tests/test_gpu.py tests/test_kernels.py and the sampler's
#                    fused-kernel test)
#            PROOF_LIMIT_S (default 270), TESTS_LIMIT_S (default 110): hard limits of the two steps (the launcher's
#            generate gets 25 s more), so the whole command ends within 7 minutes even when a step hangs (the
#            proof's report survives a kill: it is rewritten after every section and names the one it stopped in)
#
# Files in --out (6 at most): gpu_<device>.md and gpu_<device>.json (the proof's report; commit them as
# perf/results/), proof.log, tests.log (the GPU tests, then the launcher's one-node generate), install.log,
# summary.txt. Exit status 0 only when every step passed.
#
# Expected time on one H100 / H200 (an estimate from the work each step does, not a measurement): install 10 s,
# proof 3-5 min (start-up 15 s, kernels 30 s, tiny pipelines x 3 dtypes 40-80 s, staging 5 s, models 15 s, SD
# 1.5-size UNet 60 s, NCCL 20 s, CLI 15 s, NVML 2 s), tests 1-1.5 min: about 5-6.5 minutes; the limits above bound
# it at 7 minutes. perf/README.md explains the estimate.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHON=${PYTHON:-python3}
OUT_DIR=${OUT:-perf/results/device_check}
WHEELS=${WHEELS:-perf/wheels}
PROOF_LIMIT_S=${PROOF_LIMIT_S:-270}
TESTS_LIMIT_S=${TESTS_LIMIT_S:-110}
only=() merge=() dry=0 proof=1 tests=1 tests_flag=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) OUT_DIR=$2; shift 2 ;;
    --only) shift; while [[ $# -gt 0 && "$1" != --* ]]; do only+=("$1"); shift; done ;;
    --merge) shift; merge=(--merge); if [[ $# -gt 0 && "$1" != --* ]]; then merge+=("$1"); shift; fi ;;
    --tests) tests_flag=1; shift ;;
    --no-tests) tests=0; shift ;;
    --tests-only) proof=0; shift ;;
    --cpu-dry-run) dry=1; shift ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_device_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [[ ${#only[@]} -gt 0 ]]; then
  [[ $tests_flag -eq 1 ]] || tests=0
  [[ ${#merge[@]} -gt 0 ]] || merge=(--merge)
fi
mkdir -p "$OUT_DIR"
SUMMARY=$OUT_DIR/summary.txt
t_start=$(date +%s)
status=0
: > "$SUMMARY"
say() { echo "$*" | tee -a "$SUMMARY"; }
result() {  # result NAME RC SECONDS
  if [[ $2 -eq 0 ]]; then say "PASS    $1 ($3 s)"; else say "FAILED  $1 ($3 s, exit $2)"; status=1; fi
}

say "gpu_device_check $(date -u +%FT%TZ): PYTHON=$PYTHON ($(command -v "$PYTHON" || echo "not found"))"
if [[ $dry -eq 0 ]]; then
  "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
    say "FAILED: torch.cuda.is_available() is False under $PYTHON (no GPU, or a CPU-only torch build)"; exit 1; }
  command -v nvidia-smi > /dev/null && nvidia-smi -L | tee -a "$SUMMARY"
fi

# install: the carried wheels only, nothing downloaded; the project imports from this source tree as it is
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
: > "$OUT_DIR/install.log"
if compgen -G "$WHEELS/*.whl" > /dev/null; then
  t0=$(date +%s)
  if ! "$PYTHON" -m pip install --no-index --no-deps "$WHEELS"/*.whl >> "$OUT_DIR/install.log" 2>&1; then
    site=${TMPDIR:-/tmp}/driffusion_site  # site-packages not writable: a folder of our own on the path
    echo "-- retrying into $site" >> "$OUT_DIR/install.log"
    "$PYTHON" -m pip install --no-index --no-deps --upgrade --target "$site" "$WHEELS"/*.whl \
      >> "$OUT_DIR/install.log" 2>&1 && export PYTHONPATH="$site:$PYTHONPATH"
  fi
  "$PYTHON" -c "import diffusers" >> "$OUT_DIR/install.log" 2>&1
  result "install $WHEELS/*.whl (--no-index --no-deps)" $? $(( $(date +%s) - t0 ))
fi
"$PYTHON" - >> "$OUT_DIR/install.log" 2>&1 <<'EOF'
import importlib, sys
print("python", sys.version.split()[0], sys.executable)
for m in ("torch", "triton", "diffusers", "transformers", "pynvml", "pytest"):
    try:
        print(m, getattr(importlib.import_module(m), "__version__", "present"))
    except ImportError as e:
        print(m, "MISSING", e)
EOF
if ! "$PYTHON" -c "import diffusers, pytest" 2>/dev/null; then
  say "FAILED: diffusers or pytest is not importable under $PYTHON: run perf/gpu_wheels.sh on a machine with"
  say "        network and bring $WHEELS/ along (see $OUT_DIR/install.log)"
  exit 1
fi
grep -E "^(python|torch|triton|diffusers) " "$OUT_DIR/install.log" | tr '\n' ' ' | sed 's/ $/\n/' | tee -a "$SUMMARY"

if [[ $proof -eq 1 ]]; then
  args=(--out "$OUT_DIR")
  [[ $dry -eq 1 ]] && args+=(--cpu-dry-run)
  [[ ${#only[@]} -gt 0 ]] && args+=(--only "${only[@]}")
  args+=("${merge[@]}")
  echo "=== proof: $PYTHON perf/gpu_proof.py ${args[*]}  (limit $PROOF_LIMIT_S s)"
  t0=$(date +%s)
  ( unset TRITON_INTERPRET; timeout -k 10 "$PROOF_LIMIT_S" "$PYTHON" perf/gpu_proof.py "${args[@]}" ) \
    > "$OUT_DIR/proof.log" 2>&1
  rc=$?
  grep -E "^[a-z0-9_]+(\.[^ :]+)*: (PASS|FAIL|INFO)|^-- |^FAILED |^gpu_proof: " "$OUT_DIR/proof.log" | cut -c1-240
  [[ $rc -eq 124 || $rc -eq 137 ]] && say "proof killed at its $PROOF_LIMIT_S s limit: the report keeps the sections done"
  result "proof (perf/gpu_proof.py)" $rc $(( $(date +%s) - t0 ))
  grep -E "^FAILED " "$OUT_DIR/proof.log" | sed 's/^/        /' | tee -a "$SUMMARY"
  rm -f "$OUT_DIR"/*.tmp[0-9]*  # a report half-written when the limit struck (the previous one is intact)
fi

if [[ $tests -eq 1 ]]; then
  # the GPU tests, minus test_gpu.py's proof-section tests (the proof above ran those sections at full size), the
  # kernel tests compiled, the sampler's fused-kernel test on CUDA tensors; then the launcher on every GPU
  default_tests="tests/test_gpu.py tests/test_kernels.py tests/test_sampler.py::test_same_result_with_fused_kernels_on_and_off"
  read -r -a selection <<< "${TESTS:-$default_tests}"
  echo "=== tests: $PYTHON -m pytest ${selection[*]}  (limit $TESTS_LIMIT_S s)"
  t0=$(date +%s)
  if [[ $dry -eq 1 ]]; then
    timeout -k 10 "$TESTS_LIMIT_S" "$PYTHON" -m pytest -q -rs -p no:cacheprovider "${selection[@]}" \
      -k "not proof_section" > "$OUT_DIR/tests.log" 2>&1
  else
    ( unset TRITON_INTERPRET; export DRIFFUSION_TEST_GPU=1
      timeout -k 10 "$TESTS_LIMIT_S" "$PYTHON" -m pytest -q -rs -p no:cacheprovider "${selection[@]}" \
        -k "not proof_section" ) > "$OUT_DIR/tests.log" 2>&1
  fi
  rc=$?
  tail -n 1 "$OUT_DIR/tests.log"
  result "tests (pytest ${selection[*]})" $rc $(( $(date +%s) - t0 ))
  grep -E "^(FAILED|ERROR) " "$OUT_DIR/tests.log" | cut -c1-200 | sed 's/^/        /' | tee -a "$SUMMARY"
  t0=$(date +%s)
  gen_out=$(mktemp -d)
  gen=(--steps 20) gen_limit=25
  [[ $dry -eq 1 ]] && gen=(--model gmm --steps 8) gen_limit=90  # two CPU ranks on a small machine: slower
  echo "=== launch/single_node.sh ${gen[*]} (PYTHON=$PYTHON)" >> "$OUT_DIR/tests.log"
  timeout -k 5 "$gen_limit" bash launch/single_node.sh "${gen[@]}" --out "$gen_out" >> "$OUT_DIR/tests.log" 2>&1
  result "generate on every GPU (launch/single_node.sh)" $? $(( $(date +%s) - t0 ))
  rm -rf "$gen_out"
fi

say "total $(( $(date +%s) - t_start )) s; files in $OUT_DIR: $(ls "$OUT_DIR" | tr '\n' ' ')"
[[ $status -eq 0 ]] && say "ALL PASSED" || say "SOME STEPS FAILED (logs in $OUT_DIR)"
exit $status
