"""`python eval/study.py ...` = `python -m mixcon.eval.study ...` (the code lives in the package)."""
from mixcon.eval.study import main

main()
