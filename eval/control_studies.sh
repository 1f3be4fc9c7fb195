#!/bin/sh
# The studies that decide the paper's claims (issue 38), one after another on one core (one thread each).
# Each writes every run to OUT/runs.jsonl as it ends; pass --resume to continue where a stopped run left off.
#   sh eval/control_studies.sh --resume        # from the repository root
set -x
R=eval/results
# MQAR, Zoology's task and protocol: the deciding cell (64 tokens = 8 periods of P = 8, 4 pairs, every
# query after the first sampling instant), attention's pilot gate first, then the claim members
nice -n 5 mixcon study recall --cells 64:4 --vocab 128 --widths 64 --heads 1 --control-period 8 --no-progress \
    --out $R/recall/L64-p4-P8 "$@"
# the controller's own tasks, trained until the loss before the change is within 0.2 nats of ln(support)
nice -n 5 mixcon study control shift --no-progress --out $R/control/shift-trained "$@"
nice -n 5 mixcon study control extrapolation --no-progress --out $R/control/extrapolation-16 "$@"
