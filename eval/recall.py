"""`python eval/recall.py ...` = `python -m mixcon.eval.recall ...` (the code lives in the package)."""
from mixcon.eval.recall import main

main()
