"""`python tools/bench_moe.py ...` = `mixcon bench moe ...` (the code lives in mixcon/bench/moe.py)."""
from mixcon.bench.moe import main

main()
