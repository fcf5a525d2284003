"""Reference backend: plain PyTorch LM assembled from the mixers' reference modules."""
