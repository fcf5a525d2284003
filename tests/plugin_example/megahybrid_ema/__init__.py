"""An example megahybrid plug-in, kept outside the megahybrid package: importing it registers the
layer type `Q` ("ema_example"), a per-channel exponential moving average mixer.

Use it with `model.plugins: [megahybrid_ema]` (this folder on PYTHONPATH), or install a distribution
with the entry point `[project.entry-points."megahybrid.mixers"] ema = "megahybrid_ema"`.
"""

from megahybrid.mixers import LayerType, register

register(LayerType("Q", "ema_example", "mixer", "megahybrid_ema.mixer:EMAMixer",
                   description="example plug-in: per-channel EMA (tests/plugin_example)"))
