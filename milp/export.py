"""PEFT interop: export a user's memory adapters in PEFT's LoRA format, and load PEFT LoRA
adapters of the FFN linears as runtime users (served and trained in mixed batches).

**Export.**
A user's ``n`` modules on one target linear, ``Σ_j s_j B_j A_j x`` with ``s_j = α_j / r_j``,
fold exactly into a single LoRA of rank ``R = Σ_j r_j``: ``lora_A`` stacks the ``A_j``
(``[R, in]``) and ``lora_B`` concatenates the ``B_j`` (``[out, R]``) with each module's
scale folded in relative to PEFT's own ``lora_alpha / r``. The export sets PEFT's alpha of
every target to its ``R`` (scaling 1), so ``lora_B = [s_1 B_1, …, s_n B_n]``; per-target
ranks and alphas go to ``rank_pattern`` / ``alpha_pattern`` (anchored, escaped module
names). GPT-2's ``Conv1D`` targets are marked ``fan_in_fan_out``.

The directory (``adapter_config.json`` + ``adapter_model.safetensors``) is written
atomically and loads with ``PeftModel.from_pretrained(base_model, directory)``.

**Import** (:func:`import_peft`). A PEFT LoRA adapter whose targets are FFN linears the
runtime wraps becomes one user: one module per target, of the adapter's rank there, with
PEFT's scaling (``lora_alpha / r``, ``/ √r`` with ``use_rslora``, ``alpha_pattern`` matched as
PEFT matches it). A :class:`~milp.config.MemoryConfig` holds one rank per layer, for all of
the layer's targets, and one ``lora_alpha``: where the adapter's targets of one layer differ in
rank, the smaller ones are padded with zero rows, a target it leaves out in a layer it adapts
gets an all-zero module, and a scaling other than the config's ``lora_alpha / r`` is folded
into ``B``. The outputs are the same as PEFT's (tested against ``PeftModel``); padding costs
parameters (a ``UserWarning`` says how many). What the runtime cannot compute is refused:
targets outside the FFN (attention projections, embeddings), DoRA, LoRA biases,
``modules_to_save``, trainable tokens, layer replication, activated LoRA (aLoRA), adapters
initialised by methods that rewrite the base weights (PiSSA, OLoRA, CorDA, LoRA-GA, LoftQ: PEFT
converts them to plain LoRAs with ``path_initial_model_for_weight_conversion``), block-diagonal
LoRA, KaSA, MonteCLoRA, Arrow routing.

Example:
    >>> import tempfile, torch
    >>> from milp.inject import tiny_model
    >>> from milp.runtime import MilpRuntime
    >>> from milp.config import MemoryConfig
    >>> rt = MilpRuntime(tiny_model("llama"), max_users=1)
    >>> rt.add_user("u", MemoryConfig((True, True), (2, 1), ((4, 8), 16)), init="random", seed=0)
    >>> d = export_peft(rt, "u", tempfile.mkdtemp() + "/peft")
    >>> sorted(p.name for p in d.iterdir())
    ['adapter_config.json', 'adapter_model.safetensors']
"""
from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import torch

from .config import MemoryConfig, atomic_directory

__all__ = ["PEFT_CONFIG_FILE", "PEFT_WEIGHTS_FILE", "export_peft", "import_peft", "peft_adapter", "read_peft"]

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_WEIGHTS_BIN = "adapter_model.bin"  # older PEFT versions (a torch pickle, read weights-only)
# init_lora_weights methods that subtract the initial adapter from the base weights (when PEFT creates the adapter
# and again when it loads it): the adapter applies to those rewritten weights, not to the model's
_REWRITING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")
# adapter_config.json settings the runtime cannot reproduce: (key, is-set test, why)
_UNSUPPORTED = (
    ("use_dora", bool, "DoRA (weight-decomposed LoRA) rescales the merged weight per column"),
    ("bias", lambda v: v not in (None, "none"), "the adapter trains biases of the base model"),
    ("lora_bias", bool, "the adapter's lora_B has a bias"),
    ("modules_to_save", bool, "the adapter replaces whole modules (modules_to_save)"),
    ("trainable_token_indices", bool, "the adapter trains embedding rows (trainable_token_indices)"),
    ("layer_replication", bool, "the adapter duplicates layers (layer_replication)"),
    ("target_parameters", bool, "the adapter targets raw parameters (target_parameters)"),
    ("use_qalora", bool, "QA-LoRA pools the input before lora_A"),
    ("alora_invocation_tokens", bool, "activated LoRA (aLoRA) applies only from its invocation tokens on"),
    ("init_lora_weights", lambda v: isinstance(v, str) and v.lower().startswith(_REWRITING_INITS),
     "this initialisation rewrites the base weights (PEFT subtracts the initial adapter from them, again on "
     "load; PEFT converts such an adapter to a plain LoRA with save_pretrained(..., "
     "path_initial_model_for_weight_conversion=...))"),
    ("use_bdlora", lambda v: bool(v) and not (isinstance(v, Mapping) and v.get("nblocks") == 1),
     "block-diagonal LoRA (BD-LoRA) stores block-diagonal lora_A / lora_B blocks"),
    ("kasa_config", bool, "KaSA truncates the base weights' singular values and scales B A by a learned diagonal"),
    ("monteclora_config", bool, "MonteCLoRA samples its adapters"),
    ("arrow_config", bool, "Arrow routes each token among several LoRA experts"),
)


def _pattern(name: str) -> str:
    # PEFT matches pattern keys with re.match(rf"(.*\.)?({key})$", module_name)
    return "^" + re.escape(name)


def peft_adapter(runtime: Any, user: Hashable, *, base_model_name_or_path: str | os.PathLike[str] | None = None
                 ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(state_dict, config)`` of ``user``'s adapters in PEFT's LoRA format (CPU tensors
    keyed ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight``; the config as
    the dict ``LoraConfig`` reads). ``base_model_name_or_path`` (a hub id or a local path;
    default: the model's ``config._name_or_path``) goes into the config as a str.

    Example:
        >>> from milp.inject import tiny_model
        >>> from milp.runtime import MilpRuntime
        >>> from milp.config import MemoryConfig
        >>> rt = MilpRuntime(tiny_model("gpt2"), max_users=1)
        >>> rt.add_user("u", MemoryConfig((True, False), (2, 0), (4, 4)))
        >>> sd, cfg = peft_adapter(rt, "u")
        >>> tuple(sd["base_model.model.transformer.h.0.mlp.c_fc.lora_B.weight"].shape), cfg["fan_in_fan_out"]
        ((64, 8), True)
    """
    from .runtime import MilpRuntime

    if not isinstance(runtime, MilpRuntime):
        raise TypeError(f"runtime must be a MilpRuntime, got {type(runtime).__name__}")
    if isinstance(base_model_name_or_path, os.PathLike):
        base_model_name_or_path = os.fspath(base_model_name_or_path)
    if base_model_name_or_path is not None and not isinstance(base_model_name_or_path, str):
        raise TypeError(f"base_model_name_or_path must be a str, a path or None, "
                        f"got {type(base_model_name_or_path).__name__}")
    slot = runtime.slot(user)
    st = runtime.state
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    conv1d = set()
    for names, layer in zip(st.names, st.layers):
        for name, m in zip(names, layer):
            if not m.bank.has(slot):
                continue
            a, b, scale = m.bank.adapter_weights(slot)
            R = a.shape[0]
            # PEFT: y += (alpha_peft / R) * (x A^T) B_peft^T; alpha_peft = R -> scaling 1
            b_peft = (b.detach().to(torch.float64) * scale.detach().to(torch.float64)[:, None]).t()
            tensors[f"base_model.model.{name}.lora_A.weight"] = a.detach().cpu().clone().contiguous()
            b_out = b_peft.to(b.dtype)
            if not torch.isfinite(b_out).all() and torch.isfinite(b_peft).all():
                raise ValueError(f"user {user!r}: {name}'s lora_B times its scale ({float(scale.max()):g}) "
                                 f"overflows {b.dtype}; PEFT's lora_B holds it folded (export from a float32 copy)")
            tensors[f"base_model.model.{name}.lora_B.weight"] = b_out.cpu().contiguous()
            ranks[name] = R
            if m.conv1d:
                conv1d.add(name)
    if not ranks:
        raise ValueError(f"user {user!r} has no adapters (its MemoryConfig turns every layer off); nothing to export")
    if conv1d and len(conv1d) != len(ranks):
        raise ValueError("cannot export a mix of Conv1D and Linear targets in one PEFT adapter (fan_in_fan_out)")
    default_r = max(set(ranks.values()), key=list(ranks.values()).count)
    model = runtime.model
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": default_r,
        "lora_alpha": default_r,
        "target_modules": sorted(ranks),
        "rank_pattern": {_pattern(n): r for n, r in ranks.items() if r != default_r},
        "alpha_pattern": {_pattern(n): r for n, r in ranks.items() if r != default_r},
        "lora_dropout": 0.0,
        "fan_in_fan_out": bool(conv1d),
        "bias": "none",
        "use_rslora": False,
        "inference_mode": True,
    }
    return tensors, config


def export_peft(runtime: Any, user: Hashable, directory: str | os.PathLike[str], *,
                base_model_name_or_path: str | os.PathLike[str] | None = None) -> Path:
    """Write ``user``'s adapters as a PEFT LoRA adapter directory, atomically; returns it.
    Uses ``peft.LoraConfig`` to write the config when PEFT is installed.

    Example:
        >>> import tempfile
        >>> from milp.inject import tiny_model
        >>> from milp.runtime import MilpRuntime
        >>> from milp.config import MemoryConfig
        >>> rt = MilpRuntime(tiny_model("roberta"), max_users=1)
        >>> rt.add_user("u", MemoryConfig.uniform(2, 1, 8))
        >>> export_peft(rt, "u", tempfile.mkdtemp() + "/a").name
        'a'
    """
    from safetensors.torch import save_file

    tensors, config = peft_adapter(runtime, user, base_model_name_or_path=base_model_name_or_path)
    with atomic_directory(directory) as tmp:
        save_file(tensors, str(tmp / PEFT_WEIGHTS_FILE), metadata={"format": "pt"})
        try:
            from peft import LoraConfig
        except ImportError:
            (tmp / PEFT_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        else:
            cfg = dict(config)
            cfg.pop("peft_type")
            LoraConfig(**cfg).save_pretrained(str(tmp))
    return Path(directory)


# --------------------------------------------------------------------------------- import
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<kind>lora_A|lora_B)(?:\.(?P<adapter>[^.]+))?\.weight$")


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup: the first key ``k`` with
    ``re.match(rf"(.*\\.)?({k})$", module)`` (``peft.utils.other.get_pattern_key``)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


def _patterns(cfg_path: Path, config: dict, key: str) -> dict[str, Any]:
    """``config[key]`` (a ``rank_pattern`` / ``alpha_pattern``): an object of module regexes, checked."""
    patterns = config.get(key)
    if patterns is None:
        return {}
    if not isinstance(patterns, dict):
        raise ValueError(f"{str(cfg_path)!r}: {key} must be an object of module pattern -> value, "
                         f"got {patterns!r}")
    for k in patterns:
        try:
            re.compile(k)
        except re.error as e:
            raise ValueError(f"{str(cfg_path)!r}: {key} key {k!r} is not a valid regular expression: {e}") from None
    return patterns


def _positive(v: object) -> bool:
    """A number (not a bool) > 0."""
    return not isinstance(v, bool) and isinstance(v, (int, float)) and v > 0


def _load_weights(d: Path) -> dict[str, torch.Tensor]:
    if (d / PEFT_WEIGHTS_FILE).is_file():
        from safetensors.torch import load

        # from the bytes, not load_file: its mmap reader (safetensors 0.8) leaks per call (_read_tensors)
        return load((d / PEFT_WEIGHTS_FILE).read_bytes())
    if (d / PEFT_WEIGHTS_BIN).is_file():
        sd = torch.load(d / PEFT_WEIGHTS_BIN, map_location="cpu", weights_only=True)
        if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise ValueError(f"{str(d / PEFT_WEIGHTS_BIN)!r} does not hold a state dict of tensors")
        return dict(sd)
    raise FileNotFoundError(f"{str(d)!r} holds neither {PEFT_WEIGHTS_FILE} nor {PEFT_WEIGHTS_BIN}")


def read_peft(directory: str | os.PathLike[str]
              ) -> tuple[dict[str, Any], dict[str, tuple[torch.Tensor, torch.Tensor, float]]]:
    """Read a PEFT LoRA adapter directory: ``(config, {module: (lora_A [r, in], lora_B [out, r],
    scaling)})`` with PEFT's scaling of each module (``alpha / r``, or ``alpha / √r`` with
    ``use_rslora``; per-module ``rank_pattern`` / ``alpha_pattern``). Refuses what a plain
    LoRA sum cannot compute (DoRA, biases, ``modules_to_save`` …) with the reason.

    Example:
        >>> import tempfile
        >>> from milp.inject import tiny_model
        >>> from milp.runtime import MilpRuntime
        >>> rt = MilpRuntime(tiny_model("llama"), max_users=1)
        >>> rt.add_user("u", MemoryConfig.uniform(2, 1, 4, lora_alpha=8.0))
        >>> cfg, mods = read_peft(export_peft(rt, "u", tempfile.mkdtemp() + "/a"))
        >>> a, b, s = mods["model.layers.1.mlp.down_proj"]
        >>> tuple(a.shape), tuple(b.shape), s
        ((4, 64), (32, 4), 1.0)
    """
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"PEFT adapter directory {str(d)!r} does not exist")
    cfg_path = d / PEFT_CONFIG_FILE
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{str(cfg_path)!r} does not exist (not a PEFT adapter directory)")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(cfg_path)!r} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{str(cfg_path)!r} must hold a JSON object, got {type(config).__name__}")
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{str(cfg_path)!r} has peft_type {config.get('peft_type')!r}; only LORA adapters load")
    for key, is_set, why in _UNSUPPORTED:
        if is_set(config.get(key)):
            raise ValueError(f"{str(cfg_path)!r} sets {key}={config[key]!r}: {why}, which a multi-LoRA "
                             f"sum h = W x + Σ s B A x cannot compute")
    for key in ("r", "lora_alpha"):
        v = config.get(key)
        if not _positive(v):
            raise ValueError(f"{str(cfg_path)!r}: {key} must be a number > 0, got {v!r}")
    tm = config.get("target_modules")
    if not (tm is None or isinstance(tm, str) or isinstance(tm, list) and all(isinstance(m, str) for m in tm)):
        raise ValueError(f"{str(cfg_path)!r}: target_modules must be a list of module names, a regex string or "
                         f"null, got {tm!r}")
    rank_pattern = _patterns(cfg_path, config, "rank_pattern")
    alpha_pattern = _patterns(cfg_path, config, "alpha_pattern")
    rslora = bool(config.get("use_rslora"))

    parts: dict[str, dict[str, torch.Tensor]] = {}
    adapters = set()
    for key, t in _load_weights(d).items():
        m = _KEY.match(key)
        if m is None:
            raise ValueError(f"{str(d)!r}: weight {key!r} is not a lora_A/lora_B matrix (embedding LoRA, "
                             f"DoRA magnitudes, biases and saved modules are not supported)")
        if m["adapter"] is not None:
            adapters.add(m["adapter"])
        if m["kind"] in parts.setdefault(m["module"], {}):
            raise ValueError(f"{str(d)!r} holds {m['kind']} of {m['module']!r} twice (adapters {sorted(adapters)})")
        parts[m["module"]][m["kind"]] = t
    if not parts:
        raise ValueError(f"{str(d)!r} holds no LoRA weights")
    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    for name, p in sorted(parts.items()):
        if set(p) != {"lora_A", "lora_B"}:
            raise ValueError(f"{str(d)!r}: module {name!r} has {sorted(p)} but needs lora_A and lora_B")
        a, b = p["lora_A"], p["lora_B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or a.shape[0] == 0:
            raise ValueError(f"{str(d)!r}: module {name!r} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; "
                             f"expected [r, in] and [out, r] with r >= 1")
        if not a.is_floating_point() or not b.is_floating_point():
            raise TypeError(f"{str(d)!r}: module {name!r} has non-float weights ({a.dtype}, {b.dtype})")
        r = a.shape[0]
        r_cfg = _pattern_value(rank_pattern, name, config["r"])
        if r_cfg != r:
            raise ValueError(f"{str(cfg_path)!r} gives module {name!r} rank {r_cfg}, its weights have rank {r}")
        alpha = _pattern_value(alpha_pattern, name, config["lora_alpha"])
        if not _positive(alpha):
            raise ValueError(f"{str(cfg_path)!r} gives module {name!r} lora_alpha {alpha!r}; expected a number > 0")
        alpha = float(alpha)
        modules[name] = (a, b, alpha / math.sqrt(r) if rslora else alpha / r)
    return config, modules


def import_peft(runtime: Any, user: Hashable, directory: str | os.PathLike[str], *,
                total_steps: int | None = None, optim: Any = None) -> MemoryConfig:
    """Load the PEFT LoRA adapter in ``directory`` as the new user ``user`` of ``runtime``
    (served, or trained further, in mixed batches with every other user); returns the user's
    :class:`MemoryConfig`. ``total_steps`` and ``optim`` as :meth:`MilpRuntime.add_user`.

    Every target of the adapter must be an FFN linear the runtime wraps, of the model's shape.
    How PEFT's per-target ranks and scalings map onto a ``MemoryConfig`` (exactly: padding,
    all-zero modules, scalings folded into ``B``) is in the module docstring. Nothing is loaded
    when any check fails.

    Example:
        >>> import tempfile
        >>> from milp.inject import tiny_model
        >>> from milp.runtime import MilpRuntime
        >>> rt = MilpRuntime(tiny_model("llama"), max_users=2)
        >>> rt.add_user("u", MemoryConfig((True, False), (2, 0), ((4, 8), 8)), init="random", seed=0)
        >>> import_peft(rt, "v", export_peft(rt, "u", tempfile.mkdtemp() + "/a")).layer_ranks(0)
        (12,)
    """
    from .runtime import MilpRuntime, _as_key

    if not isinstance(runtime, MilpRuntime):
        raise TypeError(f"runtime must be a MilpRuntime, got {type(runtime).__name__}")
    user = _as_key(user)
    if runtime.has_user(user):
        raise ValueError(f"user {user!r} is already loaded; remove_user({user!r}) first")
    config, modules = read_peft(directory)
    st = runtime.state
    where = {name: m for names, layer in zip(st.names, st.layers) for name, m in zip(names, layer)}
    outside = [n for n in modules if n not in where]
    if outside:
        raise ValueError(
            f"{str(directory)!r} adapts {len(outside)} module(s) the runtime does not wrap, e.g. {outside[:4]}; "
            f"MiLP adapters sit on the FFN linears only (this model's: {st.names[0]} … in each of "
            f"{st.num_layers} layers)")
    for name, (a, b, _) in modules.items():
        m = where[name]
        if a.shape[1] != m.in_features or b.shape[0] != m.out_features:
            raise ValueError(f"{str(directory)!r}: module {name!r} maps {a.shape[1]} → {b.shape[0]} features, "
                             f"the model's maps {m.in_features} → {m.out_features}")
    layer_rank: dict[int, int] = {}
    for name, (a, _, _) in modules.items():
        li = where[name].layer
        layer_rank[li] = max(layer_rank.get(li, 0), a.shape[0])
    # the lora_alpha that reproduces most modules' scalings with their layer's rank (no fold)
    wanted = [round(s * layer_rank[where[n].layer], 9) for n, (_, _, s) in modules.items()]
    alpha = max(dict.fromkeys(wanted), key=wanted.count)
    L = st.num_layers
    r_any = max(layer_rank.values())
    cfg = MemoryConfig(tuple(li in layer_rank for li in range(L)), tuple(int(li in layer_rank) for li in range(L)),
                       tuple(layer_rank.get(li, r_any) for li in range(L)), lora_alpha=alpha)

    padding = sum((r_l - (modules[name][0].shape[0] if name in modules else 0)) * (m.in_features + m.out_features)
                  for li, r_l in layer_rank.items() for name, m in zip(st.names[li], st.layers[li]))
    if padding:
        warnings.warn(
            f"PEFT adapter {str(directory)!r}: a MemoryConfig has one rank per layer for all of its FFN targets, so "
            f"{padding} zero parameters pad targets of lower rank (or not adapted) up to their layer's rank; "
            f"the outputs are unchanged", UserWarning, stacklevel=2)
    runtime.add_user(user, cfg, total_steps=total_steps, optim=optim, init="zeros")
    try:
        slot = runtime.slot(user)
        tensors: dict[str, torch.Tensor] = {}
        for li, r_l in layer_rank.items():
            for name, m in zip(st.names[li], st.layers[li]):
                # into a bf16/fp16 bank hand over float32: the bank rounds, the optimizer's float32 master is
                # seeded with the adapter's own values (load_adapter_state), not with their rounding
                dt = m.bank.lora_a.dtype
                if dt in (torch.bfloat16, torch.float16):
                    dt = torch.float32
                a_full = torch.zeros(r_l, m.in_features, dtype=torch.float64)
                b_full = torch.zeros(r_l, m.out_features, dtype=torch.float64)
                if name in modules:
                    a, b, s = modules[name]
                    r = a.shape[0]
                    # fold PEFT's scaling into B relative to the scale the bank applies (alpha / r_l as the bank
                    # stores it, in float32), not the exact quotient: a float64 model then matches PEFT in float64
                    applied = m.bank.adapter_weights(slot)[2][:r].detach().to("cpu", torch.float64)
                    a_full[:r] = a.double()
                    b_full[:r] = b.double().t() * (s / applied)[:, None]
                tensors[f"layers.{li}.{m.target}.lora_A"] = a_full.to(dt)
                tensors[f"layers.{li}.{m.target}.lora_B"] = b_full.to(dt)
        runtime.load_adapter_state(user, tensors)
    except BaseException:
        runtime.remove_user(user)
        raise
    return cfg
