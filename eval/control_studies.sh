#!/bin/sh
# Issue 27's studies, one after another on one core (one thread each, nice 5); about 100 min here.
# Each writes its results as every run ends (runs.jsonl) and can be resumed with --resume.
#   sh eval/control_studies.sh            # from the repository root
set -x
R=eval/results/control
nice -n 5 python3 -m mixcon.eval.recall --members attention mamba conba-all conba-noctl conba-live hybrid-1:3 \
    hybrid-2:6 hybrid-1:7 --widths 32 --cells 256:8 512:8 --batch 16 --steps 200 --seeds 0 1 2 --warmup 20 \
    --eval-examples 256 --jobs 1 --threads 1 --instruments --budget-min 47 --no-progress --out $R/mqar "$@"
sh eval/control_studies_rest.sh "$@"
