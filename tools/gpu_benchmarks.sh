#!/usr/bin/env bash
# The GPU half of the project: the kernel tests compiled on the device, then the benchmarks whose
# results are committed under eval/results/. Each step runs under its own time limit so one slow step
# cannot lose the others; every log and result folder is packed into $OUT/results.tgz (or
# ./results.tgz) after each step.
#
#   bash tools/gpu_benchmarks.sh prepare                  # HERE, before a lease: .gpu/site (see below)
#   bash tools/gpu_benchmarks.sh quick                    # one short lease: every headline number, <= 480 s
#   bash tools/gpu_benchmarks.sh quick --plan             # its steps and time limits; runs nothing
#   bash tools/gpu_benchmarks.sh quick --smoke            # each Python step's CPU path (tiny sizes)
#   bash tools/gpu_benchmarks.sh tests conba moe          # the full run, step by step (one lease call each)
#   bash tools/gpu_benchmarks.sh throughput max_context
#   bash tools/gpu_benchmarks.sh decode                   # the compiled decode path (issue 13), alone
#   bash tools/gpu_benchmarks.sh tune-chunk               # the spill question (docs/kernels.md), <= 150 s:
#                                                         # the second call of a lease, after quick
#
# `quick` writes to eval/results/quick/ (logs in eval/results/quick/logs/); the sum of its limits is
# QUICK_BUDGET seconds at most (tests/test_gpu_benchmarks.py checks it), so that it fits one 15-minute
# lease with its start-up. mamba_ssm's Triton kernels (baselines of bench_conba: Mamba-2's SSD scan and
# its decode step) are used when importable. The GPU machines have no mamba_ssm and cannot build or
# fetch it: `prepare` (run here, where `tools/setup.sh dev` installed its CPU build) copies its Python
# source into .gpu/site (git-ignored), which the lease call carries (the device tool's carry: [".gpu"])
# and this script puts on PYTHONPATH; its CUDA extension is stubbed, its Triton kernels need none.
set -u
cd "$(dirname "$0")/.."
# the Python steps (thin scripts over mixcon.bench / mixcon.eval) import this checkout's package, installed or not
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
GPU_SITE=${GPU_SITE:-.gpu/site}  # (a test points it elsewhere)
[ -d "$GPU_SITE" ] && export PYTHONPATH="$(cd "$GPU_SITE" && pwd):$PYTHONPATH"
OUT=${OUT:-.}
QUICK_BUDGET=480
export PYTHONUNBUFFERED=1

PLAN=0
SMOKE=0
STEPS=()
for a in "$@"; do
  case $a in
    --plan) PLAN=1 ;;
    --smoke) SMOKE=1 ;;
    *) STEPS+=("$a") ;;
  esac
done
[ ${#STEPS[@]} -gt 0 ] || { echo "usage: $0 prepare | quick [--plan|--smoke] | STEP... (tests conba moe throughput decode max_context tune tune-chunk)"; exit 2; }

if [ "${STEPS[0]}" = prepare ]; then  # on this machine, no GPU: the baselines' source for the lease to carry
  src=$(python3 -c "import importlib.util as u; s = u.find_spec('mamba_ssm'); print(s.submodule_search_locations[0] if s else '')")
  [ -n "$src" ] || { echo "prepare: mamba_ssm is not installed here (bash tools/setup.sh dev installs its CPU build)"; exit 2; }
  rm -rf "$GPU_SITE.tmp" && mkdir -p "$GPU_SITE.tmp" \
    && cp -r "$src" "$GPU_SITE.tmp/mamba_ssm" && find "$GPU_SITE.tmp" -name __pycache__ -prune -exec rm -rf {} + \
    && rm -rf "$GPU_SITE" && mv "$GPU_SITE.tmp" "$GPU_SITE" || exit 1
  echo "prepare: $GPU_SITE/mamba_ssm ($(du -sh "$GPU_SITE" | cut -f1)) from $(python3 -c "import importlib.metadata as m; print('mamba_ssm', m.version('mamba_ssm'))"); carry .gpu in the lease call"
  exit 0
fi

QUICK=0
[ "${STEPS[0]}" = quick ] && QUICK=1
RESULTS=${RESULTS:-$([ $QUICK = 1 ] && echo eval/results/quick || echo eval/results)}
LOGS=$RESULTS/logs
TOTAL=0

pack() {
  if [ $QUICK = 1 ]; then
    tar czf "$OUT/results.tgz" "$RESULTS" 2>/dev/null
  else
    tar czf "$OUT/results.tgz" "$LOGS" \
      $(ls -d eval/results/conba eval/results/moe eval/results/throughput eval/results/max_context \
      eval/results/conba_tuning eval/results/throughput_compiled 2>/dev/null)
  fi
}

step() {  # name, seconds, command...  (--plan: print it; --smoke: run a Python step's CPU path)
  local name=$1 limit=$2
  shift 2
  TOTAL=$((TOTAL + limit))
  if [ $PLAN = 1 ]; then
    printf '%-12s limit %3d s   %s\n' "$name" "$limit" "$*"
    return
  fi
  if [ $SMOKE = 1 ]; then
    if [ "$1" != python3 ] || [ "$name" = tests ]; then
      echo "=== $name: no CPU path (skipped with --smoke)"
      return
    fi
    set -- env TRITON_INTERPRET=1 "$@" --smoke
    limit=${SMOKE_LIMIT:-600}  # CPU time, not the GPU plan's
  fi
  echo "=== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  echo "=== $name: exit $rc after $((SECONDS - t0))s"
  tail -n 25 "$LOGS/$name.log"
  [ $SMOKE = 1 ] || pack
}

quick() {  # every headline number in one lease; each step prints the versions and device first
  local R=$RESULTS
  step device 10 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv; \
python3 -c 'import torch, triton, transformers; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \
\"triton\", triton.__version__, \"transformers\", transformers.__version__)'"
  # the new decode kernel at every P (and its CUDA graph), the model's CUDA-graph decode, both compiled here
  step tests 80 python3 -m pytest -v -p no:cacheprovider tests/ops/test_conba_step.py \
    tests/models/test_static_cache.py::test_cuda_graph_decode_equals_eager_and_generate_takes_the_fast_path
  # B = 1, d_inner 4096, T 32K and 128K, P = 64, bf16, every mechanism on and off, forward and backward,
  # the decode step at P = 64; beside Mamba-2's SSD scan (mamba_ssm, when importable) and SDPA
  step conba 130 python3 -m mixcon bench conba --control-period 64 --batch 1 --seqlen 32768 131072 --d-inner 4096 \
    --p1-max-T 0 --ref-max-T 0 --out "$R/conba"
  # mixcon-1b prefill (chunked, eager) at 8K and 128K beside its all-attention sibling; the 1K point
  # first takes the kernels' compilation (its number is not one to read)
  step prefill 60 python3 -m mixcon bench throughput --paths dynamic --models mixcon mixtral-shaped --batch 1 \
    --contexts 1024 8192 131072 --decode-tokens 2 --out "$R/prefill"
  # compiled decode (static cache, CUDA graph) at the default P, batch 1, beside the bandwidth roofline
  step decode 140 python3 -m mixcon bench throughput --paths compiled --models mixcon --batch 1 --contexts 8192 131072 \
    --decode-tokens 32 --out "$R/decode"
  # the longest context at batch 1 on one 80 GB GPU (an H100's 81,559 MiB), on whatever card runs it
  step max_context 60 python3 -m mixcon bench max-context --models mixcon mixtral-shaped --memory-cap-gib 79.65 \
    --resolution 131072 --out "$R/max_context"
}

if [ $PLAN = 0 ]; then
  mkdir -p "$LOGS"
  if [ $QUICK = 0 ]; then
    {
      echo "# $(date -u +%FT%TZ) rev $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
      nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null
      python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
    } > "$LOGS/device.txt" 2>&1
    cat "$LOGS/device.txt"
  else
    echo "# $(date -u +%FT%TZ) rev $(git rev-parse --short HEAD 2>/dev/null || echo '?')" | tee "$LOGS/run.txt"
  fi
fi

for s in "${STEPS[@]}"; do
  case $s in
    quick) quick ;;
    tests) step tests 300 python3 -m pytest -q -p no:cacheprovider \
             ${TEST_ARGS:-tests/ops/test_conba_triton.py tests/ops/test_conba_chunk.py tests/ops/test_conba_step.py} ;;
    conba) tuned=()  # the fastest program sizes of `tune` / `tune-chunk` steps run before, if any
           [ -f eval/results/conba_tuning/best.txt ] && read -r c w < eval/results/conba_tuning/best.txt \
             && tuned=(--channels "$c" --max-warps "$w")
           [ -f eval/results/conba_tuning/chunk_best.txt ] \
             && read -r cbt cbb cw cpw < eval/results/conba_tuning/chunk_best.txt \
             && tuned+=(--chunk-block-t "$cbt" --chunk-bwd-block-t "$cbb" --chunk-warps "$cw" \
                        --bwd-channels-per-warp "$cpw")
           # P = 64 (the chunk scan), every mechanism on and off, noise off, bf16; the P = 1 kernel beside it
           step conba 420 python3 -m mixcon bench conba --control-period 64 --batch 1 8 32 \
             --seqlen 2048 8192 32768 131072 --d-inner 4096 8192 "${tuned[@]}" --out eval/results/conba ;;
    moe) step moe 120 python3 -m mixcon bench moe --out eval/results/moe ;;
    throughput) step throughput 280 python3 -m mixcon bench throughput --batch 1 8 --decode-tokens 16 --time-budget 50 \
                  --paths dynamic --out eval/results/throughput ;;
    # issue 13: each model's fast decode (static cache + torch.compile reduce-overhead = CUDA graphs),
    # batch 1 at 8K-256K and batch 8/64, with a profile (launches per token, time per kernel) at 8K;
    # one lease call (< 10 min); DECODE_MODELS / DECODE_BATCH narrow it when time is short
    decode) step decode 560 python3 -m mixcon bench throughput --paths compiled --batch ${DECODE_BATCH:-1 8 64} \
              --contexts 8192 32768 131072 262144 --decode-tokens 64 --time-budget 130 --profile \
              --models ${DECODE_MODELS:-mixcon jamba-shaped mixtral-shaped hf-mixtral} \
              --out eval/results/throughput_compiled ;;
    max_context) step max_context 120 python3 -m mixcon bench max-context --out eval/results/max_context ;;
    tune) step tune 90 python3 -m mixcon bench conba-tune --out eval/results/conba_tuning ;;
    # the chunk scan (P = 64) forward and backward per block / backward block, and the P = 1 backward's
    # warps: the configurations that spill ahead of time beside those that do not (docs/kernels.md)
    tune-chunk) step tune-chunk 150 python3 -m mixcon bench conba-tune --chunk --out eval/results/conba_tuning ;;
    *) echo "unknown step $s (quick tests conba moe throughput decode max_context tune tune-chunk)"; exit 2 ;;
  esac
done

if [ $PLAN = 1 ]; then
  echo "sum of limits: $TOTAL s$([ $QUICK = 1 ] && echo " (budget $QUICK_BUDGET s)")"
  if [ -d "$GPU_SITE/mamba_ssm" ]; then echo "baselines: $GPU_SITE/mamba_ssm present (carry .gpu)"
  else echo "baselines: no $GPU_SITE: run 'bash tools/gpu_benchmarks.sh prepare' first, or Mamba-2's SSD is missing"; fi
  [ $QUICK = 0 ] || [ $TOTAL -le $QUICK_BUDGET ] || { echo "the quick plan exceeds its budget"; exit 1; }
fi
