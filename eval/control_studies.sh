#!/bin/sh
# The studies that decide the paper's claims (issue 38), one after another on one core (one thread each).
# Each writes every run to OUT/runs.jsonl as it ends; pass --resume to continue where a stopped run left off.
#   sh eval/control_studies.sh --resume        # from the repository root
set -x
R=eval/results
# MQAR, Zoology's task and protocol: the deciding cell (64 tokens = 8 periods of P = 8, 4 pairs, every
# query after the first sampling instant), attention's pilot gate first, then the claim members
CELL="--cells 64:4 --vocab 128 --widths 64 --heads 1 --control-period 8 --no-progress --out $R/recall/L64-p4-P8"
nice -n 5 mixcon study recall $CELL --members attention mamba conba-all conba-noctl conba-live hybrid-1:3 hybrid-2:6 \
    hybrid-1:7 "$@"
# a pure Conba of the hybrids' depth (8): its sweep from the top, conba-all's rate first (~1.3 CPU-hours a run)
nice -n 5 mixcon study recall $CELL --members conba-deep --lrs 1e-2 3e-3 1e-3 "$@"
# the controller's own tasks, trained until the loss before the change is within 0.2 nats of ln(support)
nice -n 5 mixcon study control shift --no-progress --out $R/control/shift-trained "$@"
# attention missed that target on the test sequences (gap 0.22-0.26): trained again, longer and to a tighter stop
nice -n 5 mixcon study control shift --members attention --steps 6000 --target-gap 0.1 --no-progress \
    --out $R/control/shift-trained-attention "$@"
nice -n 5 mixcon study control extrapolation --no-progress --out $R/control/extrapolation-16 "$@"
# the same at 3000 steps: the 600-step run above ends undertrained (loss 2.8 at the training length)
nice -n 5 mixcon study control extrapolation --steps 3000 --no-progress --out $R/control/extrapolation-16-s3000 "$@"
# attention's settled loss missed the 0.2-nat target in seed 0 (0.215): trained again at twice the steps
nice -n 5 mixcon study control extrapolation --members attention --steps 6000 --no-progress \
    --out $R/control/extrapolation-16-s6000-attention "$@"
# live - off was borderline at 3 seeds: seeds 3-5 of the three Conba members (a second look)
nice -n 5 mixcon study control extrapolation --steps 3000 --members conba-noctl conba-live conba-all --seeds 3 4 5 \
    --no-progress --out $R/control/extrapolation-16-s3000 --resume "$@"
# more pairs per state at a 6000-step cap (the 3000-step one failed attention's gate): the pilot gate, then
# every member (~25 CPU-hours; last, being the longest)
nice -n 5 mixcon study recall --cells 64:8 --vocab 128 --widths 64 --heads 1 --control-period 8 --steps 6000 \
    --no-progress --out $R/recall/L64-p8-P8-s6000 "$@"
