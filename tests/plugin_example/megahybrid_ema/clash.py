"""A broken plug-in for the error test: it registers symbol `d`, which DeltaNet already holds."""

from megahybrid.mixers import LayerType, register

register(LayerType("d", "my_deltanet", "mixer", "megahybrid_ema.mixer:EMAMixer"))
