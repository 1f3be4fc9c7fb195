"""`python eval/max_context.py ...` = `mixcon bench max-context ...` (the code lives in mixcon/bench/max_context.py)."""
from mixcon.bench.max_context import main

main()
