"""`python eval/throughput.py ...` = `mixcon bench throughput ...` (the code lives in mixcon/bench/throughput.py)."""
from mixcon.bench.throughput import main

main()
