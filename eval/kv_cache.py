"""`python eval/kv_cache.py ...` = `mixcon bench kv-cache ...` (the code lives in mixcon/bench/kv_cache.py)."""
from mixcon.bench.kv_cache import main

main()
