"""`python tools/tune_conba.py ...` = `mixcon bench conba-tune ...` (the code lives in mixcon/bench/conba_tune.py)."""
from mixcon.bench.conba_tune import main

main()
