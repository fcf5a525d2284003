"""Checkpoint conversion: Hugging Face <-> megahybrid <-> Megatron-Core distributed checkpoints.

`megahybrid convert SRC DST --to {hf,megahybrid,megatron}`; the Python entry point is
`megahybrid.convert.convert`. One module per HF architecture (`hf_<name>.py`) registers an
`HFArchitecture` (base.py); `megatron_dist.py` writes and reads Megatron-Core `torch_dist`
checkpoints at any TP/PP/EP.
"""

from megahybrid.convert.api import convert, detect, load_reference, read
from megahybrid.convert.base import ARCHITECTURES, ConversionError, HFArchitecture, load_all

__all__ = ["convert", "detect", "load_reference", "read", "ARCHITECTURES", "ConversionError",
           "HFArchitecture", "load_all"]
