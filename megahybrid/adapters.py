"""Parameter-efficient adapters on any `nn.Linear` of any mixer: LoRA, DoRA, VeRA, DyLoRA.

- LoRA, Hu et al. 2021 (arXiv 2106.09685): y = W x + b + (alpha / r) B A dropout(x); A Kaiming-uniform,
  B zero, so a fresh adapter leaves the model's output unchanged.
- DoRA, Liu et al. 2024 (arXiv 2402.09353): W' = m * (W + s B A) / ||W + s B A|| (norm per output row,
  detached as in the paper's section 4.3), m initialised to ||W||; matches peft's `DoraLinearLayer`.
- VeRA, Kopiczko et al. 2023 (arXiv 2310.11454): frozen random A [r, in], B [out, r] shared by every
  adapted linear (sliced from one pair of the largest sizes, regenerated from `vera_seed`, so they are
  not stored), trainable vectors d [r] (init 0.1) and b [out] (init 0): y = W x + b * (B (d * (A x))).
  `alpha` is not used (VeRA has no scale).
- DyLoRA, Valipour et al. 2022 (arXiv 2210.07558): LoRA trained at a rank sampled uniformly from
  1..r on each training forward (the first rows of A / columns of B, scale alpha / rank), so every
  truncation works; eval and merge use `dylora_eval_rank` (default r).
- QLoRA (Dettmers et al. 2023, arXiv 2305.14314) needs a 4-bit NF4 base from bitsandbytes on a GPU;
  it is refused with a one-line error until that is wired.

Why our own code: the `peft` library is not installed in this environment (and the project adds no
dependency for this now); the formulas are short. Parameter names follow peft where they can
(`lora_A`, `lora_B`, `magnitude`, `vera_lambda_d`, `vera_lambda_b`), and the base weights keep their
names (`...q_proj.weight`), so a base checkpoint loads into an adapted model unchanged.

Metadata (method, rank, alpha, targets, dtype, adapted modules, sha256 of the base weights) is written
as `adapters.json` next to `adapters.safetensors` (`save_adapters`) and into training checkpoints
(train/checkpoint.py); loading checks it field by field, so adapters are only composed with or merged
into the base model they were trained on.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megahybrid.config import ConfigError, fail

ADAPTER_PARAMS = ("lora_A", "lora_B", "magnitude", "vera_lambda_d", "vera_lambda_b")
METADATA, WEIGHTS = "adapters.json", "adapters.safetensors"
# Linears whose weight is read directly (not through forward), so a wrapper could not act on them:
# the reference LM's head (`x @ lm_head.weight.t()`) and Hyena's implicit-filter MLP.
DIRECT_WEIGHT_READERS = ("lm_head", "implicit_filter")
_COMPARED = ("method", "rank", "alpha", "targets", "dtype", "vera_seed", "dylora_eval_rank", "modules")


def check_config(a, path: str = "model.adapters") -> None:
    """One-line errors for adapter settings that cannot work."""
    if a.method == "none":
        return
    if a.method == "qlora":
        fail(f"{path}.method", a.method, "needs a 4-bit NF4 base from bitsandbytes on a GPU, which is not wired "
             "yet; use 'lora' (or 'dora') on a bfloat16 base")
    if a.rank < 1:
        fail(f"{path}.rank", a.rank, "must be >= 1")
    if not 0.0 <= a.dropout < 1.0:
        fail(f"{path}.dropout", a.dropout, "must be in [0, 1)")
    if not a.targets:
        fail(f"{path}.targets", a.targets, "must list at least one module-name pattern, e.g. [q_proj, in_proj]")
    if a.dylora_eval_rank is not None and not 1 <= a.dylora_eval_rank <= a.rank:
        fail(f"{path}.dylora_eval_rank", a.dylora_eval_rank, f"must be in [1, rank={a.rank}] or null")


def _matches(name: str, pattern: str) -> bool:
    """A pattern with a dot matches the full module name; one without matches its last component."""
    return fnmatch.fnmatchcase(name if "." in pattern else name.rsplit(".", 1)[-1], pattern)


def _dtype(a, weight: torch.Tensor) -> torch.dtype:
    return weight.dtype if a.dtype == "auto" else getattr(torch, a.dtype)


class AdaptedLinear(nn.Linear):
    """An nn.Linear that keeps the base `weight`/`bias` Parameters (same names) and adds a low-rank
    update; subclasses define `delta(x)` (the update's output) and `merged_weight()`."""

    def __init__(self, base: nn.Linear):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias

    def merged(self) -> nn.Linear:
        """A plain nn.Linear computing the same function (eval mode) with the update folded in."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(self.merged_weight().to(self.weight.dtype))
            if self.bias is not None:
                out.bias.copy_(self.bias)
        out.weight.requires_grad_(self.weight.requires_grad)
        if out.bias is not None:
            out.bias.requires_grad_(self.bias.requires_grad)
        return out


class LoRALinear(AdaptedLinear):
    """LoRA (arXiv 2106.09685); peft's initialisation (A Kaiming-uniform a=sqrt(5), B zero)."""

    def __init__(self, base: nn.Linear, a):
        super().__init__(base)
        dtype = _dtype(a, base.weight)
        self.rank, self.alpha = a.rank, a.alpha
        self.lora_A = nn.Parameter(torch.empty(a.rank, self.in_features, device=base.weight.device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, a.rank, device=base.weight.device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(a.dropout) if a.dropout > 0 else nn.Identity()

    def active_rank(self) -> int:
        return self.rank

    def low_rank(self, x: torch.Tensor, rank: int) -> torch.Tensor:
        A, B = self.lora_A[:rank], self.lora_B[:, :rank]
        return F.linear(F.linear(x.to(A.dtype), A), B) * (self.alpha / rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        return y + self.low_rank(self.dropout(x), self.active_rank()).to(y.dtype)

    def delta_weight(self, rank: Optional[int] = None) -> torch.Tensor:
        rank = rank or self.rank
        return (self.lora_B[:, :rank] @ self.lora_A[:rank]) * (self.alpha / rank)

    def merged_weight(self) -> torch.Tensor:
        return self.weight + self.delta_weight().to(self.weight.dtype)


class DyLoRALinear(LoRALinear):
    """DyLoRA (arXiv 2210.07558): a random rank in 1..r per training forward; eval uses `eval_rank`."""

    def __init__(self, base: nn.Linear, a):
        super().__init__(base, a)
        self.eval_rank = a.dylora_eval_rank or a.rank

    def active_rank(self) -> int:
        if self.training:
            return int(torch.randint(1, self.rank + 1, ()).item())
        return self.eval_rank

    def merged_weight(self) -> torch.Tensor:
        return self.weight + self.delta_weight(self.eval_rank).to(self.weight.dtype)


class DoRALinear(LoRALinear):
    """DoRA (arXiv 2402.09353), unmerged form as in peft: y = g * (W x + s B A x) + b with
    g = m / ||W + s B A||_row (the norm detached, paper section 4.3)."""

    def __init__(self, base: nn.Linear, a):
        super().__init__(base, a)
        with torch.no_grad():
            norm = base.weight.to(self.lora_A.dtype).norm(dim=1)
        self.magnitude = nn.Parameter(norm)

    def _gain(self) -> torch.Tensor:
        full = self.weight.to(self.lora_A.dtype) + self.delta_weight()
        return self.magnitude / full.norm(dim=1).detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xd = self.dropout(x)
        g = self._gain()
        base = F.linear(xd.to(g.dtype), self.weight.to(g.dtype))
        y = g * (base + self.low_rank(xd, self.rank))
        if not isinstance(self.dropout, nn.Identity):  # the base path sees the undropped input (peft)
            y = y + F.linear((x - xd).to(g.dtype), self.weight.to(g.dtype))
        y = y.to(x.dtype)
        return y + self.bias if self.bias is not None else y

    def merged_weight(self) -> torch.Tensor:
        full = self.weight.to(self.lora_A.dtype) + self.delta_weight()
        return (self.magnitude / full.norm(dim=1))[:, None] * full


class VeRALinear(AdaptedLinear):
    """VeRA (arXiv 2310.11454): shared frozen random A, B (non-persistent buffers), trainable d, b."""

    def __init__(self, base: nn.Linear, a, shared_A: torch.Tensor, shared_B: torch.Tensor):
        super().__init__(base)
        dtype = _dtype(a, base.weight)
        dev = base.weight.device
        self.register_buffer("vera_A", shared_A[:, : self.in_features].to(dev, dtype), persistent=False)
        self.register_buffer("vera_B", shared_B[: self.out_features].to(dev, dtype), persistent=False)
        self.vera_lambda_d = nn.Parameter(torch.full((a.rank,), 0.1, device=dev, dtype=dtype))
        self.vera_lambda_b = nn.Parameter(torch.zeros(self.out_features, device=dev, dtype=dtype))
        self.dropout = nn.Dropout(a.dropout) if a.dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        h = F.linear(self.dropout(x).to(self.vera_A.dtype), self.vera_A) * self.vera_lambda_d
        return y + (F.linear(h, self.vera_B) * self.vera_lambda_b).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        return self.vera_lambda_b[:, None] * self.vera_B @ (self.vera_lambda_d[:, None] * self.vera_A)

    def merged_weight(self) -> torch.Tensor:
        return self.weight + self.delta_weight().to(self.weight.dtype)


def _vera_shared(a, linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor]:
    """One frozen random pair of the largest sizes, from `vera_seed` on CPU (same on every device)."""
    gen = torch.Generator().manual_seed(a.vera_seed)
    max_in = max(m.in_features for m in linears)
    max_out = max(m.out_features for m in linears)
    A, B = torch.empty(a.rank, max_in), torch.empty(max_out, a.rank)
    for t in (A, B):  # Kaiming-uniform, as peft's VeRA init
        bound = math.sqrt(6.0 / ((1 + 5) * t.shape[1]))
        t.uniform_(-bound, bound, generator=gen)
    return A, B


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def apply_adapters(model: nn.Module, a) -> nn.Module:
    """Wrap every nn.Linear whose name matches one of `a.targets`; freeze the rest if `a.freeze_base`.
    Records the settings as `model.adapter_metadata`. A pattern matching no linear is an error."""
    check_config(a)
    if a.method == "none":
        return model
    if adapter_modules(model):
        raise ConfigError("model.adapters: the model already has adapters; merge_adapters(model) first to stack more")
    linears = {n: m for n, m in model.named_modules() if type(m) is nn.Linear}
    chosen: dict[str, nn.Linear] = {}
    for pattern in a.targets:
        hits = {n: m for n, m in linears.items() if _matches(n, pattern)}
        if not hits:
            names = sorted({n.rsplit(".", 1)[-1] for n in linears if not _refused(n)})
            fail("model.adapters.targets", pattern, f"matches no linear of this model; its linears: {', '.join(names)}")
        for n in hits:
            if _refused(n):
                fail("model.adapters.targets", pattern, f"matches {n!r}, whose weight is read directly, so an adapter "
                     "there would do nothing; target the mixers' projections instead")
        chosen.update(hits)
    shared = _vera_shared(a, list(chosen.values())) if a.method == "vera" else None
    for name, linear in chosen.items():
        if a.method == "vera":
            wrapped = VeRALinear(linear, a, *shared)
        else:
            wrapped = {"lora": LoRALinear, "dora": DoRALinear, "dylora": DyLoRALinear}[a.method](linear, a)
        _set_module(model, name, wrapped)
    if a.freeze_base:
        for n, p in model.named_parameters():
            p.requires_grad_(n.rsplit(".", 1)[-1] in ADAPTER_PARAMS)
    model.adapter_metadata = {"method": a.method, "rank": a.rank, "alpha": a.alpha, "targets": list(a.targets),
                              "dtype": a.dtype, "vera_seed": a.vera_seed, "dylora_eval_rank": a.dylora_eval_rank,
                              "modules": sorted(chosen)}
    return model


def _refused(name: str) -> bool:
    return any(part in DIRECT_WEIGHT_READERS for part in name.split("."))


def adapter_modules(model: nn.Module) -> dict[str, AdaptedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, AdaptedLinear)}


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (plain nn.Linear again); afterwards new adapters can be
    applied on top (composition). Drops `model.adapter_metadata`."""
    for name, module in adapter_modules(model).items():
        _set_module(model, name, module.merged())
    if hasattr(model, "adapter_metadata"):
        del model.adapter_metadata
    return model


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] in ADAPTER_PARAMS}


def base_sha256(model: nn.Module) -> str:
    """sha256 over the names, shapes, dtypes and bytes of every non-adapter parameter and buffer."""
    h = hashlib.sha256()
    adapter = set(adapter_state_dict(model))
    for name, t in sorted(model.state_dict().items()):
        if name in adapter:
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def metadata(model: nn.Module, with_base_hash: bool = True) -> Optional[dict]:
    """The adapter metadata to save with `model`, or None if it has no adapters."""
    meta = getattr(model, "adapter_metadata", None)
    if meta is None:
        return None
    return {**meta, "base_model_sha256": base_sha256(model)} if with_base_hash else dict(meta)


def check_metadata(saved: dict, model: nn.Module, source: str, check_base: bool = True) -> None:
    """One-line CheckpointError-style ConfigError naming the first field where `saved` and `model` differ."""
    current = metadata(model, with_base_hash=check_base)
    if current is None:
        raise ConfigError(f"{source}: holds {saved.get('method')} adapters but the model has none; set "
                          f"model.adapters.method={saved.get('method')!r} (and its rank/alpha/targets)")
    for key in _COMPARED:
        if saved.get(key) != current.get(key):
            raise ConfigError(f"{source}: adapters.{key}={saved.get(key)!r} but this model has {current.get(key)!r}; "
                              f"set model.adapters.{key} to match (or use the matching adapters)")
    if check_base and saved.get("base_model_sha256") != current["base_model_sha256"]:
        raise ConfigError(f"{source}: adapters.base_model_sha256={saved.get('base_model_sha256')!r} differs from "
                          f"this base model's {current['base_model_sha256']!r}: the adapters were trained on other "
                          "base weights; load those base weights first")


def save_adapters(model: nn.Module, directory) -> Path:
    """Write `adapters.safetensors` (adapter weights only) and `adapters.json` (metadata) to `directory`."""
    from safetensors.torch import save_file

    meta = metadata(model)
    if meta is None:
        raise ConfigError("save_adapters: the model has no adapters (model.adapters.method='none')")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({n: t.contiguous() for n, t in adapter_state_dict(model).items()}, str(directory / WEIGHTS))
    (directory / METADATA).write_text(json.dumps(meta, indent=1))
    return directory


def load_adapters(model: nn.Module, directory) -> nn.Module:
    """Load adapters saved by `save_adapters` into `model` (which must carry the same adapter settings
    and the same base weights: any difference is a one-line error naming the field)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    saved = json.loads((directory / METADATA).read_text())
    check_metadata(saved, model, str(directory / METADATA))
    state = load_file(str(directory / WEIGHTS), device=str(next(model.parameters()).device))
    missing = set(adapter_state_dict(model)) ^ set(state)
    if missing:
        raise ConfigError(f"{directory / WEIGHTS}: adapter tensors differ from the model's: {sorted(missing)[:3]}")
    model.load_state_dict(state, strict=False)
    return model
