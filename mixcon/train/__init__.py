"""Training: tokenizer, data shards, recipes, the loop, checkpoints (parallelism applied outside the model)."""
