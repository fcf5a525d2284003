"""Megatron-Core backend: the same `Config` built from Megatron `ModuleSpec`s with Transformer Engine,
mamba-ssm and flash-linear-attention kernels (model.py), the Config -> TransformerConfig translation
and the FP8 switch (transformer_config.py), the reference <-> Megatron parameter table (mapping.py)
and the checked lift of FLA's Hopper GDN guard (gdn_guard.py). Imports Megatron only when used."""
