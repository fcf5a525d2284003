"""Layer-pattern language: parse, expand and resolve every layout form to one `LayerSpec` list.

Grammar (whitespace ignored)::

    pattern := main ('/' mtp)*          # Megatron: every MTP part identical, one per depth
    main    := (item | '|')*            # '|' = pipeline segment boundary (Megatron fVPP)
    item    := atom ('x' N)?            # N >= 1 repeats the atom
    atom    := SYMBOL | '(' main ')'

Symbols come from the registry (`megahybrid.mixers.REGISTRY`). For patterns of Megatron
symbols only, the resolved layers equal Megatron-Core 0.19.2's `parse_hybrid_pattern` +
`select_pipeline_segment` (tests/cpu/test_pattern.py checks it against Megatron's own parser).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megahybrid.config import ConfigError, fail
from megahybrid.mixers import REGISTRY, by_name
from megahybrid.plugins import load_plugins

PIPE, MTP, OPEN, CLOSE, REPEAT = "|", "/", "(", ")", "x"
ATTENTION = "*"
CHANNEL_KINDS = ("channel",)


class PatternError(ConfigError):
    """A bad pattern; the first line names the position and the fix, then a caret line."""


@dataclass(frozen=True)
class LayerSpec:
    """One sublayer (pre-norm + mixer + residual)."""

    index: int
    """Position in the main decoder (MTP layers continue the count)."""
    symbol: str
    name: str
    kind: str
    """mixer or channel."""
    segment: int = 0
    """Pipe-delimited segment (0 if the pattern has no '|')."""
    mtp_depth: int = 0
    """0 for the main decoder, d >= 1 for the d-th multi-token-prediction depth."""


@dataclass
class ParsedPattern:
    """A pattern after repetition expansion, in Megatron's terms."""

    main: str
    """Main decoder symbols with '|' kept (Megatron's `main_pattern`)."""
    mtp: Optional[str] = None
    mtp_depths: int = 0

    @property
    def segments(self) -> list[str]:
        return self.main.split(PIPE)

    @property
    def main_layers(self) -> list[str]:
        return list(self.main.replace(PIPE, ""))


def _error(source: str, pos: int, message: str, field_name: str = "model.pattern") -> PatternError:
    caret = " " * pos + "^"
    return PatternError(f"{field_name}: {message} (position {pos})\n  {source}\n  {caret}")


def expand(source: str, field_name: str = "model.pattern") -> str:
    """Remove whitespace and expand `(...)xN` / `AxN`; keep '|' and '/'. Errors point at the spot."""
    text, positions = [], []
    for i, ch in enumerate(source):
        if not ch.isspace():
            text.append(ch)
            positions.append(i)
    text_str = "".join(text)
    valid = set(REGISTRY) | {PIPE, MTP}

    def parse_seq(i: int, depth: int) -> tuple[str, int]:
        out = []
        while i < len(text_str):
            ch = text_str[i]
            if ch == CLOSE:
                if depth == 0:
                    raise _error(source, positions[i], "unbalanced ')': no '(' opens it; remove it", field_name)
                return "".join(out), i
            if ch == OPEN:
                inner, j = parse_seq(i + 1, depth + 1)
                if j >= len(text_str):
                    raise _error(source, positions[i], "unbalanced '(': add the closing ')'", field_name)
                if not inner.replace(PIPE, ""):
                    raise _error(source, positions[i], "empty group '()': put layer symbols inside", field_name)
                atom, i = inner, j + 1
            elif ch == REPEAT:
                raise _error(source, positions[i], "'x' must follow a symbol or ')' and precede a count, "
                             "e.g. (M*)x4", field_name)
            elif ch in valid:
                atom, i = ch, i + 1
            elif ch.isdigit():
                raise _error(source, positions[i], f"stray count {ch!r}: write repetition as (...)xN", field_name)
            else:
                known = " ".join(sorted(REGISTRY))
                raise _error(source, positions[i], f"unknown layer symbol {ch!r}; valid symbols: {known} "
                             "(and | / ( )xN)", field_name)
            if i < len(text_str) and text_str[i] == REPEAT:
                j = i + 1
                while j < len(text_str) and text_str[j].isdigit():
                    j += 1
                if j == i + 1:
                    raise _error(source, positions[i], "'x' needs a repeat count after it, e.g. (M*)x4", field_name)
                count = int(text_str[i + 1:j])
                if count < 1:
                    raise _error(source, positions[i + 1], f"repeat count {count} must be >= 1", field_name)
                if atom in (PIPE, MTP):
                    raise _error(source, positions[i], f"{atom!r} cannot be repeated on its own", field_name)
                atom, i = atom * count, j
            out.append(atom)
        if depth > 0:
            return "".join(out), i
        return "".join(out), i

    expanded, _ = parse_seq(0, 0)
    return expanded


def parse(source: str, field_name: str = "model.pattern") -> ParsedPattern:
    """Expand `source` and split it Megatron's way into main / MTP parts."""
    flat = expand(source, field_name)
    if not flat.replace(PIPE, "").replace(MTP, ""):
        raise PatternError(f"{field_name}={source!r}: the pattern has no layers; add layer symbols, e.g. 'M*M-'")
    parts = flat.split(MTP)
    main = parts[0]
    mtp_parts = [p for p in parts[1:]]
    if not mtp_parts or all(p == "" for p in mtp_parts):
        return ParsedPattern(main=main)
    first = mtp_parts[0]
    for k, part in enumerate(mtp_parts[1:], start=2):
        if part != first:
            raise PatternError(f"{field_name}={source!r}: MTP part {k} is {part!r} but part 1 is {first!r}; "
                               "every '/'-separated MTP depth must repeat the same layers (Megatron's rule)")
    if PIPE in first:
        raise PatternError(f"{field_name}={source!r}: '|' is not allowed in the MTP part {first!r}; "
                           "pipeline boundaries belong to the main pattern")
    return ParsedPattern(main=main, mtp=first, mtp_depths=len(mtp_parts))


def pattern_from_ratio(num_layers: int, attention_count: int, backbone: str, attention: str = ATTENTION) -> str:
    """Evenly spaced attention layers, starting and ending with the backbone: Megatron-Core's
    `pattern_from_ratios` allocator (hybrid_layer_allocation.py), generalised to any backbone."""
    backbone_count = num_layers - attention_count
    section_len = backbone_count / (attention_count + 1)
    layers, x = [], section_len
    for _ in range(num_layers):
        if x < 0.5:
            layers.append(attention)
            x += section_len
        else:
            layers.append(backbone)
            x -= 1
    return "".join(layers)


def _layout_from_backbone(m) -> str:
    """backbone + num_layers + (attention_every | attention_layers | ratio) -> a pattern string."""
    lt = by_name(m.backbone)
    if lt is None or lt.kind != "mixer":
        fail("model.backbone", m.backbone, f"must name a sequence mixer, one of "
             f"{sorted(t.name for t in REGISTRY.values() if t.kind == 'mixer')}")
    if m.num_layers is None or m.num_layers < 1:
        fail("model.num_layers", m.num_layers, "must be >= 1 when model.backbone is set")
    n = m.num_layers
    placements = [k for k in ("attention_every", "attention_layers", "ratio") if getattr(m, k) is not None]
    if len(placements) > 1:
        fail(f"model.{placements[1]}", getattr(m, placements[1]),
             f"conflicts with model.{placements[0]}; keep only one attention placement")
    attention = _attention_symbol(m)
    mixers = [lt.symbol] * n
    if m.attention_every is not None:
        if m.attention_every < 1:
            fail("model.attention_every", m.attention_every, "must be >= 1")
        for i in range(m.attention_every - 1, n, m.attention_every):
            mixers[i] = attention
    elif m.attention_layers is not None:
        for i in m.attention_layers:
            if not 0 <= i < n:
                fail("model.attention_layers", m.attention_layers,
                     f"index {i} is outside 0..{n - 1} (model.num_layers={n})")
            mixers[i] = attention
    elif m.ratio is not None:
        if len(m.ratio) != 2 or min(m.ratio) < 0 or sum(m.ratio) == 0:
            fail("model.ratio", m.ratio, "must be [backbone, attention] non-negative counts, e.g. [9, 1]")
        count = round(n * m.ratio[1] / sum(m.ratio))
        mixers = list(pattern_from_ratio(n, count, lt.symbol, attention))
    channel = _channel_symbol("mlp_after_mixer", m.mlp_after_mixer)
    after_attention = _channel_symbol("mlp_after_attention", m.mlp_after_attention) \
        if m.mlp_after_attention is not None else channel
    return "".join(sym + (after_attention if sym == attention else channel) for sym in mixers)


def _attention_symbol(m) -> str:
    """The symbol `model.attention_symbol` names (what backbone layouts place as attention)."""
    lt = by_name(m.attention_symbol)
    if lt is None or lt.kind != "mixer":
        fail("model.attention_symbol", m.attention_symbol, "must name a sequence mixer, e.g. attention or swa")
    return lt.symbol


def _channel_symbol(name: str, value) -> str:
    if value is None:
        return ""
    ch = by_name(value)
    if ch is None or ch.kind != "channel":
        channels = ", ".join(f"{t.symbol!r} ({t.name})" for t in REGISTRY.values() if t.kind == "channel")
        fail(f"model.{name}", value, f"must be a channel layer: {channels}; or null")
    return ch.symbol


def _layout_from_names(names: list[str]) -> str:
    out = []
    for i, name in enumerate(names):
        if name in (PIPE, MTP):
            out.append(name)
            continue
        lt = by_name(name)
        if lt is None:
            known = sorted(t.name for t in REGISTRY.values())
            fail(f"model.layers[{i}]", name, f"unknown layer name; valid: {', '.join(known)}")
        out.append(lt.symbol)
    return "".join(out)


def layout_string(m) -> tuple[str, str]:
    """(pattern string, config field it came from) for whichever layout form `m` uses.
    Plug-in modules (`model.plugins`, entry points) are imported first: they may add symbols."""
    load_plugins(getattr(m, "plugins", ()))
    forms = [k for k in ("pattern", "layers", "backbone") if getattr(m, k) is not None]
    if not forms:
        raise ConfigError("model: no layer layout; set model.pattern (e.g. '(M*-)x4'), model.layers, "
                          "or model.backbone with model.num_layers")
    if len(forms) > 1:
        fail(f"model.{forms[1]}", getattr(m, forms[1]),
             f"conflicts with model.{forms[0]}; give exactly one layout form")
    if forms[0] != "backbone":
        for k in ("attention_every", "attention_layers", "ratio", "mlp_after_mixer", "mlp_after_attention"):
            if getattr(m, k) is not None:
                fail(f"model.{k}", getattr(m, k), "only applies with model.backbone; remove it")
    if forms[0] == "pattern":
        return m.pattern, "model.pattern"
    if forms[0] == "layers":
        return _layout_from_names(m.layers), "model.layers"
    return _layout_from_backbone(m), "model.backbone"


def resolve_layers(config) -> list[LayerSpec]:
    """Config (or ModelConfig) -> the checked list of `LayerSpec`s (main decoder, then MTP)."""
    m = getattr(config, "model", config)
    parallel = getattr(config, "parallel", None)
    text, field_name = layout_string(m)
    parsed = parse(text, field_name)
    specs = _specs(parsed)
    symbols = {s.symbol for s in specs}
    if ATTENTION in symbols and symbols & {"+", "D"}:
        fail(field_name, text, "mixes '*' attention with '+' (MLA) or 'D' (DSA); Megatron-Core supports "
             "only one attention kind per model")
    if parallel is not None:
        _check_pipeline(parsed, parallel, field_name, text)
    for sym in sorted(symbols):
        REGISTRY[sym].cls().check(m)
    if parallel is not None and _balances_by_flops(parsed, parallel):
        specs = _specs(balance_pipeline(config, parsed))
    return specs


def _specs(parsed: ParsedPattern) -> list[LayerSpec]:
    specs = []
    for seg_index, seg in enumerate(parsed.segments):
        for sym in seg:
            lt = REGISTRY[sym]
            specs.append(LayerSpec(len(specs), sym, lt.name, lt.kind, seg_index))
    for depth in range(1, parsed.mtp_depths + 1):
        for sym in parsed.mtp or "":
            lt = REGISTRY[sym]
            specs.append(LayerSpec(len(specs), sym, lt.name, lt.kind, len(parsed.segments) - 1, depth))
    return specs


def _balances_by_flops(parsed: ParsedPattern, parallel) -> bool:
    return getattr(parallel, "pp_balance", "layers") == "flops" and parallel.pp > 1 and len(parsed.segments) == 1


def pipeline_pattern(config) -> ParsedPattern:
    """The config's parsed pattern with the stage cuts its pipeline uses: the '|' as written, or those
    parallel.pp_balance='flops' places (`balance_pipeline`). Feed `.segments` to `stage_of`."""
    parsed = parse(*layout_string(config.model))
    return balance_pipeline(config, parsed) if _balances_by_flops(parsed, config.parallel) else parsed


def balance_cuts(costs: list[float], parts: int, first_extra: float = 0.0, last_extra: float = 0.0) -> list[int]:
    """Sizes of `parts` contiguous, non-empty groups of `costs` that minimise the largest group's sum,
    `first_extra` / `last_extra` added to the first / last group (embedding, LM head). An exact dynamic
    programme over the cut positions, O(parts * n^2); among equal optima the earliest cuts win."""
    n = len(costs)
    if not 1 <= parts <= n:
        raise ValueError(f"cannot cut {n} layers into {parts} non-empty stages")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def group(j: int, i: int) -> float:  # layers j..i-1
        return prefix[i] - prefix[j] + (first_extra if j == 0 else 0.0) + (last_extra if i == n else 0.0)

    best = [[float("inf")] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    for i in range(1, n + 1):
        best[1][i] = group(0, i)
    for k in range(2, parts + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                value = max(best[k - 1][j], group(j, i))
                if value < best[k][i]:
                    best[k][i], cut[k][i] = value, j
    sizes, i = [], n
    for k in range(parts, 1, -1):
        sizes.append(i - cut[k][i])
        i = cut[k][i]
    return [i, *reversed(sizes)]


def balance_pipeline(config, parsed: ParsedPattern) -> ParsedPattern:
    """`parsed` (no '|') with parallel.pp x vpp stage cuts placed by `balance_cuts` on each layer's
    forward FLOPs/token at train.seq_len (the LM head and any MTP layers count on the last stage; the
    embedding lookup costs none). `.main` is the pattern to paste: Megatron needs '|' for uneven stages."""
    m, p = config.model, config.parallel
    seq_len = config.train.seq_len if hasattr(config, "train") else m.max_seq_len
    symbols = set(parsed.main_layers) | set(parsed.mtp or "")
    cost = {sym: float(REGISTRY[sym].cls().flops_per_token(m, seq_len, True)) for sym in symbols}
    last = 2.0 * m.hidden_size * m.vocab_size + parsed.mtp_depths * sum(cost[s] for s in parsed.mtp or "")
    layers = parsed.main_layers
    sizes = balance_cuts([cost[s] for s in layers], p.pp * (p.vpp or 1), last_extra=last)
    segments, start = [], 0
    for size in sizes:
        segments.append("".join(layers[start:start + size]))
        start += size
    return ParsedPattern(main=PIPE.join(segments), mtp=parsed.mtp, mtp_depths=parsed.mtp_depths)


def _check_pipeline(parsed: ParsedPattern, parallel, field_name: str, text: str) -> None:
    n_seg = len(parsed.segments)
    if getattr(parallel, "pp_balance", "layers") == "flops" and parallel.pp > 1:
        stages = parallel.pp * (parallel.vpp or 1)
        if n_seg > 1:
            fail("parallel.pp_balance", "flops", f"{field_name} already places the stages with '|'; remove "
                 "the '|' boundaries or set parallel.pp_balance=layers")
        if stages > len(parsed.main_layers):
            fail("parallel.pp", parallel.pp, f"gives {stages} pipeline stages (pp x vpp) for "
                 f"{len(parsed.main_layers)} layers; every stage needs a layer: lower parallel.pp or parallel.vpp")
        return
    stages = parallel.pp * (parallel.vpp or 1)
    if n_seg > 1 and n_seg % parallel.pp:
        fail(field_name, text, f"has {n_seg} '|'-delimited segments, not a multiple of parallel.pp="
             f"{parallel.pp}; add or remove '|' boundaries")
    if n_seg > 1 and parallel.vpp is not None and n_seg != stages:
        fail(field_name, text, f"has {n_seg} segments but parallel.pp x parallel.vpp = {stages}; "
             "make them equal")
    if n_seg == 1 and parallel.pp > 1:
        if parallel.vpp is not None:
            fail("parallel.vpp", parallel.vpp, f"needs '|' boundaries in {field_name} to place "
                 "virtual stages (Megatron's rule)")
        if len(parsed.main_layers) % parallel.pp:
            fail("parallel.pp", parallel.pp, f"does not divide the {len(parsed.main_layers)} layers; "
                 f"add '|' stage boundaries to {field_name} or change parallel.pp")


def stage_of(spec: LayerSpec, num_segments: int, num_main_layers: int, pp: int) -> tuple[int, int]:
    """(pipeline rank, virtual stage) holding `spec`, as Megatron's `select_pipeline_segment` assigns."""
    if num_segments > 1:
        return spec.segment % pp, spec.segment // pp
    if spec.mtp_depth:
        return pp - 1, 0
    return spec.index // (num_main_layers // pp), 0
