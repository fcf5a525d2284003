"""Training data: the embedded corpus, the byte-level BPE tokenizer, Megatron indexed datasets
(.bin/.idx) and the packed, blended, stateless batch sampler."""
