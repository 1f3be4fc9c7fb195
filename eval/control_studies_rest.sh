#!/bin/sh
# The studies of eval/control_studies.sh after the main MQAR grid (P = 16, initialisation, shift, extrapolation).
set -x
R=eval/results/control
nice -n 5 python3 -m mixcon.eval.control_study init --seq-len 256 --out $R/init "$@"
nice -n 5 python3 -m mixcon.eval.recall --members conba-all conba-live hybrid-2:6 --control-period 16 \
    --widths 32 --cells 256:8 --batch 16 --steps 200 --seeds 0 1 2 --warmup 20 --eval-examples 256 \
    --jobs 1 --threads 1 --instruments --budget-min 8 --no-progress --out $R/mqar-p16 "$@"
nice -n 5 python3 -m mixcon.eval.control_study shift --steps 300 --budget-min 18 --no-progress --out $R/shift "$@"
nice -n 5 python3 -m mixcon.eval.control_study extrapolation --budget-min 18 --no-progress --out $R/extrapolation "$@"
