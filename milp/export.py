"""Export one user's memory adapters in PEFT's LoRA format.

A user's ``n`` modules on one target linear, ``Σ_j s_j B_j A_j x`` with ``s_j = α_j / r_j``,
fold exactly into a single LoRA of rank ``R = Σ_j r_j``: ``lora_A`` stacks the ``A_j``
(``[R, in]``) and ``lora_B`` concatenates the ``B_j`` (``[out, R]``) with each module's
scale folded in relative to PEFT's own ``lora_alpha / r``. The export sets PEFT's alpha of
every target to its ``R`` (scaling 1), so ``lora_B = [s_1 B_1, …, s_n B_n]``; per-target
ranks and alphas go to ``rank_pattern`` / ``alpha_pattern`` (anchored, escaped module
names). GPT-2's ``Conv1D`` targets are marked ``fan_in_fan_out``.

The directory (``adapter_config.json`` + ``adapter_model.safetensors``) is written
atomically and loads with ``PeftModel.from_pretrained(base_model, directory)``.

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
import os
import re
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import torch

from .config import atomic_directory

__all__ = ["PEFT_CONFIG_FILE", "PEFT_WEIGHTS_FILE", "export_peft", "peft_adapter"]

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"


def _pattern(name: str) -> str:
    # PEFT matches pattern keys with re.match(rf"(.*\.)?({key})$", module_name)
    return "^" + re.escape(name)


def peft_adapter(runtime: Any, user: Hashable, *, base_model_name_or_path: str | None = None
                 ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(state_dict, config)`` of ``user``'s adapters in PEFT's LoRA format (CPU tensors
    keyed ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight``; the config as
    the dict ``LoraConfig`` reads).

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
            tensors[f"base_model.model.{name}.lora_B.weight"] = b_peft.to(b.dtype).cpu().contiguous()
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
                base_model_name_or_path: str | None = None) -> Path:
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
