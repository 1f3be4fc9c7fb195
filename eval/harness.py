"""`python eval/harness.py ...` = `mixcon eval ...` (the code lives in the package)."""
from mixcon.eval.harness import main

main()
