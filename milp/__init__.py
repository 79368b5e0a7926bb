"""MiLP: memory-injected LLM personalization on Hugging Face models.

Each user's history is written into LoRA adapters on the FFN linears of a base LLM;
many users' adapters are trained and served in the same batch through the fused
multi-LoRA kernels of :mod:`kernels`.

Example:
    >>> import torch, milp
    >>> rt = milp.MilpRuntime(milp.tiny_model("llama"), max_users=8)
    >>> rt.add_user("alice", milp.MemoryConfig.uniform(2, modules=2, rank=8), total_steps=100)
    >>> losses = rt.train_step(torch.randint(3, 90, (2, 16)), users="alice")
    >>> rt.generate(torch.ones(1, 4, dtype=torch.long), ["alice"], max_new_tokens=2,
    ...             do_sample=False, pad_token_id=0).shape
    torch.Size([1, 6])
"""
from __future__ import annotations

from . import _hf_kernels  # noqa: F401  (first: refuses a clash with Hugging Face's `kernels`)
from .config import MAX_MODULES, MemoryConfig, atomic_directory, atomic_write_bytes, atomic_write_text
from .decode import ContinuousBatch, continuous_unsupported
from .export import export_peft, import_peft, peft_adapter, read_peft
from .inject import (
    SUPPORTED_ARCHITECTURES,
    MilpState,
    MultiLoraLinear,
    apply_milp,
    batch_users,
    ffn_target_shapes,
    ffn_targets,
    get_milp,
    is_injected,
    remove_milp,
    tiny_model,
)
from .kvcache import GrowingCache, SlotCache
from .losses import mean_token_loss, token_losses
from .optim import AdamWConfig, LossScaling, PackedAdamW, lr_multiplier, warmup_steps
from .pipeline import (
    Answer,
    InstructionAdapter,
    add_instruction_adapter,
    generate_responses,
    instruction_tune,
    memory_inject,
    remove_instruction_adapter,
    response_losses,
    score,
)
from .runtime import MilpRuntime, mixed_batches, pad_sequences, user_losses, user_losses_from_ce
from .sampling import Sampling, TokenLogprob
from .store import CacheInfo, UserStore, user_dirname

__all__ = [
    "MAX_MODULES",
    "SUPPORTED_ARCHITECTURES",
    "AdamWConfig",
    "Answer",
    "CacheInfo",
    "ContinuousBatch",
    "GrowingCache",
    "SlotCache",
    "InstructionAdapter",
    "LossScaling",
    "MemoryConfig",
    "MilpRuntime",
    "MilpState",
    "MultiLoraLinear",
    "add_instruction_adapter",
    "continuous_unsupported",
    "generate_responses",
    "instruction_tune",
    "memory_inject",
    "remove_instruction_adapter",
    "response_losses",
    "score",
    "PackedAdamW",
    "Sampling",
    "TokenLogprob",
    "UserStore",
    "apply_milp",
    "atomic_directory",
    "atomic_write_bytes",
    "atomic_write_text",
    "batch_users",
    "export_peft",
    "ffn_target_shapes",
    "ffn_targets",
    "get_milp",
    "import_peft",
    "is_injected",
    "lr_multiplier",
    "mixed_batches",
    "pad_sequences",
    "peft_adapter",
    "read_peft",
    "remove_milp",
    "tiny_model",
    "user_dirname",
    "user_losses",
    "user_losses_from_ce",
    "token_losses",
    "mean_token_loss",
    "warmup_steps",
]
