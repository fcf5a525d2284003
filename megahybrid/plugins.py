"""Plug-in mixers: layer types defined outside the megahybrid package.

A plug-in is a Python module that, when imported, registers one or more layer types:

    from megahybrid.mixers import LayerType, register
    register(LayerType("Q", "my_mixer", "mixer", "my_package.my_mixer:MyMixer", description="..."))

Two ways to have it imported before a config's layer pattern is resolved:
- `model.plugins: [my_package.my_mixer]` in the config (import paths; saved with every checkpoint, so a
  checkpoint loads wherever the module is importable);
- an installed distribution declaring an entry point in the group `megahybrid.mixers`
  (pyproject: `[project.entry-points."megahybrid.mixers"] my_mixer = "my_package.my_mixer"`); every
  such entry point is loaded once per process, the first time any pattern is resolved.

The contract a plug-in's layer type must meet:
- `register` rules (megahybrid/mixers/__init__.py): one character, not a digit, 'x', whitespace or
  one of ( ) | /; symbol, name and aliases unique. Use a character YAML and shells take plainly (a
  letter; not '@', '`', '#'). Megatron's symbols and megahybrid's lowercase symbols are taken.
- `target` names a `megahybrid.mixers.base.Mixer` subclass built as `cls(model_config, index=i,
  shared=dict)`. A sequence mixer implements `forward_segment(x, state) -> (y, state)` (the base class
  handles packed documents) and keeps the state contract: running a sequence in pieces with the state
  carried equals running it whole. A per-token layer (kind "channel") sets `token_wise = True`.
- `check(config)` raises `megahybrid.config.ConfigError` (use `fail(field, value, fix)`) for sizes
  it cannot build; it runs on every config that uses the symbol.
- `flops_per_token(config, seq_len, causal)` returns its forward FLOPs per token (2 per multiply-add);
  `megahybrid describe` and MFU use it.
- Its sizes live in the plug-in's own code (or reuse a built-in section such as `model.attention`):
  `ModelConfig` has no free-form section, so unknown keys stay errors.
The reference backend builds plug-in layers; the Megatron backend refuses them (`check_megatron`).
"""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import Iterable

from megahybrid.config import fail

ENTRY_POINT_GROUP = "megahybrid.mixers"

_entry_points_loaded = False


def load_plugins(paths: Iterable[str] | None = (), field: str = "model.plugins") -> None:
    """Import the installed entry-point plug-ins (once per process), then each module in `paths`.

    A module already imported is not imported again, so its registrations run once. Errors name the
    config field and the module path: a module that cannot be imported, or a registration that clashes
    with a layer type already known (the registry's message names both)."""
    _load_entry_points()
    for i, path in enumerate(paths or ()):
        where = f"{field}[{i}]"
        if not isinstance(path, str) or not path.strip():
            fail(where, path, "must be a Python import path such as my_package.my_mixer")
        try:
            importlib.import_module(path)
        except ModuleNotFoundError as err:
            fail(where, path, f"cannot import it ({err}); install the package or add its folder to PYTHONPATH")
        except ValueError as err:  # `register` refuses a bad or clashing layer type
            fail(where, path, f"its layer type was refused: {err}")


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as err:  # one broken installed plug-in must name itself, not crash obscurely
            raise ImportError(f"megahybrid plug-in entry point {ep.name!r} = {ep.value!r} (group "
                              f"{ENTRY_POINT_GROUP!r}) failed to load: {err}") from err
