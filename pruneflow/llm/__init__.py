"""One-shot pruning of causal language models (DESIGN.md §9): calibration data,
block-by-block pruning, perplexity and zero-shot evaluation, the pipeline."""
