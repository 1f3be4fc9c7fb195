#!/usr/bin/env bash
# The GPU half of the project in one go: the kernel tests compiled on the device, then the
# benchmarks whose results are committed under eval/results/. Each step runs under its own time
# limit so one slow step cannot lose the others; every log and result folder is packed into
# $OUT/results.tgz (or ./gpu-results.tgz) after each step.
#
#   bash tools/gpu_benchmarks.sh tests conba moe          # one lease call
#   bash tools/gpu_benchmarks.sh throughput max_context   # another
#   bash tools/gpu_benchmarks.sh decode                   # the compiled decode path (issue 13), alone
#
# mamba_ssm's Triton kernels (baselines of bench_conba) are used when importable; a source copy
# of the package can be put on PYTHONPATH (its CUDA extension is stubbed by the benchmark).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-.}
LOGS=eval/results/logs
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1

pack() {
  tar czf "$OUT/results.tgz" eval/results/logs \
    $(ls -d eval/results/conba eval/results/moe eval/results/throughput eval/results/max_context \
    eval/results/conba_tuning eval/results/throughput_compiled 2>/dev/null)
}

step() {  # name, seconds, command...
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  echo "=== $name: exit $rc after $((SECONDS - t0))s"
  tail -n 25 "$LOGS/$name.log"
  pack
}

{
  echo "# $(date -u +%FT%TZ) rev $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} > "$LOGS/device.txt" 2>&1
cat "$LOGS/device.txt"

for s in "$@"; do
  case $s in
    tests) step tests 300 python3 -m pytest -q -p no:cacheprovider \
             ${TEST_ARGS:-tests/ops/test_conba_triton.py tests/ops/test_conba_chunk.py} ;;
    conba) tuned=()  # the fastest program size of a `tune` step run before, if any
           [ -f eval/results/conba_tuning/best.txt ] && read -r c w < eval/results/conba_tuning/best.txt \
             && tuned=(--channels "$c" --max-warps "$w")
           # P = 64 (the chunk scan), every mechanism on and off, noise off, bf16; the P = 1 kernel beside it
           step conba 420 python3 tools/bench_conba.py --control-period 64 --batch 1 8 32 \
             --seqlen 2048 8192 32768 131072 --d-inner 4096 8192 "${tuned[@]}" --out eval/results/conba ;;
    moe) step moe 120 python3 tools/bench_moe.py --out eval/results/moe ;;
    throughput) step throughput 280 python3 eval/throughput.py --batch 1 8 --decode-tokens 16 --time-budget 50 \
                  --paths dynamic --out eval/results/throughput ;;
    # issue 13: each model's fast decode (static cache + torch.compile reduce-overhead = CUDA graphs),
    # batch 1 at 8K-256K and batch 8/64, with a profile (launches per token, time per kernel) at 8K;
    # one lease call (< 10 min); DECODE_MODELS / DECODE_BATCH narrow it when time is short
    decode) step decode 560 python3 eval/throughput.py --paths compiled --batch ${DECODE_BATCH:-1 8 64} \
              --contexts 8192 32768 131072 262144 --decode-tokens 64 --time-budget 130 --profile \
              --models ${DECODE_MODELS:-mixcon jamba-shaped mixtral-shaped hf-mixtral} \
              --out eval/results/throughput_compiled ;;
    max_context) step max_context 120 python3 eval/max_context.py --out eval/results/max_context ;;
    tune) step tune 90 python3 tools/tune_conba.py --out eval/results/conba_tuning ;;
    *) echo "unknown step $s (tests conba moe throughput decode max_context tune)"; exit 2 ;;
  esac
done
