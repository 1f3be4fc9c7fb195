"""`python eval/ablation.py ...` = `python -m mixcon.eval.ablation ...` (the code lives in the package)."""
from mixcon.eval.ablation import main

main()
