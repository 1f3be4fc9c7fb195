"""CPU benchmark of Conba: one layer beside transformers' Mamba2Mixer, the hybrid's prefill and decode
beside its all-attention sibling, and the scan alone against the reference loop. The logic lives in
mixcon/bench/conba_cpu.py (see its docstring for what is timed); the same as `mixcon bench conba-cpu`.

Usage:  python tools/bench_conba_cpu.py [--parts layer model scan] [--threads 2] [--out eval/results/cpu]
"""

from mixcon.bench.conba_cpu import main

if __name__ == "__main__":
    main()
