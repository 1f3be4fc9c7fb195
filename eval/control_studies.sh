#!/bin/sh
# Issue 27's studies, one after another on one core (one thread each, nice 5); about 95 min on a shared core.
# Each writes its results as every run ends (runs.jsonl) and resumes with --resume (pass it as an argument).
# MQAR at vocabulary 16, 4 pairs: at vocabulary 64 / 8 pairs every member sat at chance (1/32) after 200 steps.
#   sh eval/control_studies.sh            # from the repository root
set -x
R=eval/results/control
MQ="--widths 32 --vocab 16 --steps 300 --seeds 0 1 2 --warmup 20 --eval-examples 256 --jobs 1 --threads 1 --instruments --no-progress"
ALL="attention mamba conba-all conba-noctl conba-live hybrid-1:3 hybrid-2:6 hybrid-1:7"
nice -n 5 python3 -m mixcon.eval.recall --members $ALL --cells 256:4 --batch 16 $MQ --budget-min 25 --out $R/mqar-L256-P64 "$@"
nice -n 5 python3 -m mixcon.eval.recall --members $ALL --cells 512:4 --batch 8 $MQ --budget-min 25 --out $R/mqar-L512-P64 "$@"
nice -n 5 python3 -m mixcon.eval.recall --members conba-all conba-live --control-period 16 --cells 256:4 --batch 16 $MQ \
    --budget-min 8 --out $R/mqar-L256-P16 "$@"
nice -n 5 python3 -m mixcon.eval.control_study init --seq-len 256 --out $R/init
nice -n 5 python3 -m mixcon.eval.control_study shift --steps 300 --budget-min 16 --no-progress --out $R/shift "$@"
nice -n 5 python3 -m mixcon.eval.control_study extrapolation --budget-min 16 --no-progress --out $R/extrapolation "$@"
