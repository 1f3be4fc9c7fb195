"""`python tools/bench_conba.py ...` = `mixcon bench conba ...` (the code lives in mixcon/bench/conba.py)."""
from mixcon.bench.conba import main

main()
