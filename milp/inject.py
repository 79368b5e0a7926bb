"""Inject multi-user LoRA memory into the FFN linears of a Hugging Face model.

:func:`apply_milp` replaces every FFN target linear by a :class:`MultiLoraLinear` that
holds one :class:`kernels.AdapterBank` (all users' adapters for that linear, packed
ragged) and calls :func:`kernels.lora_linear`. Base weights are frozen;
:func:`remove_milp` puts the original modules back.

How a layer learns the batch's users without a change to the model's forward
signature: :func:`batch_users` (a context manager) sets one user slot per batch row (or
per token). The first injected layer a forward reaches builds the
:class:`kernels.BatchPlan` for the flattened ``[B*S]`` tokens (each token → its row's
user) and every later layer reuses it: the plan depends only on the users and the
activations' leading shape, so it is cached under that key — one build per forward,
and none at all for the decode steps of ``generate`` after the first (S=1, same
users). Plans live in fixed-capacity buffers (one per power-of-two token bucket and
device) that :meth:`kernels.BatchPlan.update` rewrites in place. A batch expanded by
``generate`` (``num_return_sequences``/beams: ``B*k`` rows, repeat-interleaved) maps
row ``i`` to user ``i // k``.

Compiled code (``torch.compile``, CUDA graphs) cannot build plans: building reads Python
state that changes with every batch, and a graph traced over it would be re-traced for
each one. :meth:`MilpState.prepare_static` registers a *static* plan for one leading
shape instead; :meth:`MilpState.set_users` rewrites every registered static plan in place
(same buffers, so a captured CUDA graph stays valid) and compiled forwards only look it
up. :meth:`milp.MilpRuntime.generate` registers the decode shape itself when asked for a
static cache (``cache_implementation="static"``, with which ``transformers`` compiles the
decode step: CUDA graphs on a GPU).

Example:
    >>> import torch
    >>> model = tiny_model("llama")
    >>> state = apply_milp(model, max_users=4)
    >>> _ = state.add_adapters(1, {0: (8, 8)}, lora_alpha=16.0, init="random")
    >>> with batch_users(model, [1, -1]):
    ...     logits = model(torch.zeros(2, 5, dtype=torch.long)).logits
    >>> remove_milp(model) is model
    True
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

import kernels
from kernels import AdapterBank, AdapterSegment, BatchPlan
from kernels._checks import check_device

from .config import _check_bool

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "MilpState",
    "MultiLoraLinear",
    "apply_milp",
    "batch_users",
    "ffn_target_shapes",
    "ffn_targets",
    "get_milp",
    "is_injected",
    "remove_milp",
    "tiny_model",
]

_STATE_ATTR = "_milp_state"


@dataclass(frozen=True)
class _Arch:
    family: str
    layer_paths: tuple[str, ...]  # where the list of blocks lives (with / without the LM head)
    targets: tuple[str, ...]  # FFN target linears inside a block


_LLAMA = _Arch("LLaMA-family", ("model.layers", "layers"), ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))
_GPT2 = _Arch("GPT-2/DialoGPT", ("transformer.h", "h"), ("mlp.c_fc", "mlp.c_proj"))
_ROBERTA = _Arch("RoBERTa", ("roberta.encoder.layer", "encoder.layer"), ("intermediate.dense", "output.dense"))
_PHI = _Arch("Phi", ("model.layers", "layers"), ("mlp.fc1", "mlp.fc2"))
# Phi-3, Phi-3.5 and Phi-4: gate and up projections fused into one linear (chunked after it),
# which is one target, as in PEFT
_PHI3 = _Arch("Phi-3/Phi-4", ("model.layers", "layers"), ("mlp.gate_up_proj", "mlp.down_proj"))
_OPT = _Arch("OPT", ("model.decoder.layers", "decoder.layers"), ("fc1", "fc2"))
_NEOX = _Arch("GPT-NeoX/Pythia", ("gpt_neox.layers", "layers"), ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h"))
_FALCON = _Arch("Falcon", ("transformer.h", "h"), ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h"))
_STARCODER2 = _Arch("StarCoder2", ("model.layers", "layers"), ("mlp.c_fc", "mlp.c_proj"))

#: ``config.model_type`` → where the FFN targets are. Each is tested on a tiny random-init
#: model (:func:`tiny_model`): injection, outputs against a reference, removal, losses.
SUPPORTED_ARCHITECTURES: dict[str, _Arch] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma": _LLAMA,
    "gemma2": _LLAMA,
    "gemma3_text": _LLAMA,
    "olmo": _LLAMA,
    "olmo2": _LLAMA,
    "granite": _LLAMA,
    "stablelm": _LLAMA,
    "cohere": _LLAMA,
    "phi": _PHI,
    "phi3": _PHI3,
    "opt": _OPT,
    "gpt_neox": _NEOX,
    "falcon": _FALCON,
    "starcoder2": _STARCODER2,
    "gpt2": _GPT2,
    "roberta": _ROBERTA,
}


def _supported_text() -> str:
    by_family: dict[str, list[str]] = {}
    for mtype, arch in SUPPORTED_ARCHITECTURES.items():
        by_family.setdefault(f"{arch.family} ({', '.join(arch.targets)})", []).append(mtype)
    return "supported model_type values: " + "; ".join(
        f"{', '.join(types)}: {family}" for family, types in by_family.items()) + (
        " (GPT-2's targets are Conv1D; mixture-of-experts FFNs are not supported)")


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # pragma: no cover - transformers without Conv1D
        return None
    return Conv1D


def _is_conv1d(m: nn.Module) -> bool:
    c = _conv1d_type()
    return c is not None and isinstance(m, c)


def _get(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for part in path.split("."):
        if not hasattr(obj, part):
            return None
        obj = getattr(obj, part)
    return obj


def _arch(model: nn.Module) -> tuple[_Arch, str]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a Hugging Face model), got {type(model).__name__}")
    cfg = getattr(model, "config", None)
    mtype = getattr(cfg, "model_type", None)
    if mtype not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"unsupported architecture {type(model).__name__} (model_type={mtype!r}); {_supported_text()}"
        )
    arch = SUPPORTED_ARCHITECTURES[mtype]
    for path in arch.layer_paths:
        layers = _get(model, path)
        if isinstance(layers, nn.ModuleList):
            return arch, path
    raise ValueError(
        f"{type(model).__name__} (model_type={mtype!r}) has no block list at any of {list(arch.layer_paths)}: "
        f"it has no FFN targets to inject"
    )


def ffn_targets(model: nn.Module) -> list[list[tuple[str, nn.Module]]]:
    """Per layer, ``(qualified name, module)`` of each FFN target linear (in target order).

    On an injected model the modules are the :class:`MultiLoraLinear` wrappers.

    Example:
        >>> [name for name, _ in ffn_targets(tiny_model("gpt2"))[0]]
        ['transformer.h.0.mlp.c_fc', 'transformer.h.0.mlp.c_proj']
    """
    arch, path = _arch(model)
    layers = _get(model, path)
    out: list[list[tuple[str, nn.Module]]] = []
    for i, block in enumerate(layers):
        row = []
        for t in arch.targets:
            m = _get(block, t)
            if m is None:
                raise ValueError(f"layer {i} ({path}.{i}) has no FFN target {t!r}; {_supported_text()}")
            base = m.base if isinstance(m, MultiLoraLinear) else m
            if _in_out_attrs(base) is None:
                raise TypeError(
                    f"{path}.{i}.{t} is a {type(base).__name__}, expected nn.Linear, transformers Conv1D or a "
                    f"linear-like module (a quantized linear) with int in_features/out_features attributes"
                )
            row.append((f"{path}.{i}.{t}", m))
        out.append(row)
    if not out:
        raise ValueError(f"{type(model).__name__} has no FFN targets (0 layers at {path}); {_supported_text()}")
    return out


def _in_out_attrs(base: nn.Module) -> tuple[int, int] | None:
    """``(in, out)`` features of a linear-like module: ``nn.Linear`` (and its quantized
    subclasses), ``Conv1D`` (weight ``[in, out]``), or any module with int ``in_features`` /
    ``out_features`` (``infeatures`` / ``outfeatures``: GPTQ's); ``None`` otherwise."""
    if _is_conv1d(base):
        w = cast(torch.Tensor, base.weight)
        return int(w.shape[0]), int(w.shape[1])
    for names in (("in_features", "out_features"), ("infeatures", "outfeatures")):
        dims = tuple(getattr(base, n, None) for n in names)
        if all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims):
            return dims  # type: ignore[return-value]
    return None


def _in_out(m: nn.Module) -> tuple[int, int]:
    dims = _in_out_attrs(m.base if isinstance(m, MultiLoraLinear) else m)
    assert dims is not None
    return dims


def _dense_weight(base: nn.Module) -> bool:
    """Whether the kernels can read ``base``'s weight as a plain float matrix: an ``nn.Linear``
    or ``Conv1D`` itself (not a subclass with its own forward) holding a plain float tensor (not
    a quantized or other tensor subclass)."""
    conv1d = _conv1d_type()
    if type(base) is not nn.Linear and (conv1d is None or type(base) is not conv1d):
        return False
    w = getattr(base, "weight", None)
    return isinstance(w, torch.Tensor) and type(w.data) is torch.Tensor and w.dtype.is_floating_point


def _module_device(m: nn.Module) -> torch.device:
    for t in (*m.parameters(), *m.buffers()):
        return t.device
    return torch.device("cpu")


def ffn_target_shapes(model: nn.Module) -> list[list[tuple[int, int]]]:
    """Per layer, ``(in_features, out_features)`` of each FFN target.

    Example:
        >>> ffn_target_shapes(tiny_model("llama"))[0]
        [(32, 64), (32, 64), (64, 32)]
    """
    return [[_in_out(m) for _, m in layer] for layer in ffn_targets(model)]


# --------------------------------------------------------------------------- the layer
class MultiLoraLinear(nn.Module):
    """A frozen FFN linear plus all users' adapters for it.

    ``forward(x)`` = ``base(x)`` when no users are set (bit-identical to the original),
    else ``kernels.lora_linear`` with the current batch's plan: the base GEMM and the adapters
    together where the base is a plain ``nn.Linear`` / ``Conv1D`` with a float weight
    (``dense``); otherwise (a quantized linear: bitsandbytes, GPTQ, AWQ, a torchao tensor
    subclass…) ``base(x)`` plus the adapters' contribution alone (``weight=None``), with
    adapters of ``dtype`` (default: the base weight's dtype where it is a float, else the
    default float dtype; :func:`apply_milp` passes the model's).

    Example:
        >>> m = MultiLoraLinear(nn.Linear(8, 4), max_users=2, layer=0, target="mlp.up_proj")
        >>> m(torch.randn(3, 8)).shape
        torch.Size([3, 4])
    """

    def __init__(self, base: nn.Module, max_users: int, layer: int, target: str, capacity: int = 0,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
            raise ValueError(f"layer must be an int >= 0 (the block index), got {layer!r}")
        if not isinstance(target, str) or not target:
            raise TypeError(f"target must be the target's non-empty name (a str), got {target!r}")
        dims = _in_out_attrs(base)
        if dims is None:
            raise TypeError(f"base must be a linear-like module (in_features/out_features), got {type(base).__name__}")
        self.base = base
        self.layer = layer
        self.target = target
        self.conv1d = _is_conv1d(base)
        self.dense = _dense_weight(base)
        if self.dense:
            weight = cast(torch.Tensor, base.weight)
            dtype, device = weight.dtype, weight.device
        else:
            if dtype is None:  # the base weight's dtype where the banks can hold it (not int8, float8…)
                w = getattr(base, "weight", None)
                w_dtype = w.dtype if isinstance(w, torch.Tensor) else None
                floats = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
                dtype = w_dtype if w_dtype is not None and w_dtype in floats else torch.get_default_dtype()
            device = _module_device(base)
        self.bank = AdapterBank(dims[0], dims[1], max_users, capacity=capacity, dtype=dtype, device=device)
        self._milp_state: MilpState | None = None

    @property
    def in_features(self) -> int:
        return self.bank.in_features

    @property
    def out_features(self) -> int:
        return self.bank.out_features

    def base_weight(self) -> torch.Tensor:
        """The base weight as ``[out, in]`` (a transposed view for ``Conv1D``)."""
        w = cast(torch.Tensor, self.base.weight)
        return w.t() if self.conv1d else w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        st = self._milp_state
        if torch.compiler.is_compiling():
            # no test of the batch's users here: it would make the graph depend on them;
            # users without adapters in this bank have rank 0 and leave y = base(x). A bool, not
            # ``row_users is None``: reading the tensor guards on its shape, so per-row [B] and
            # per-token [B, S] users of the same activations would each trace a graph
            if st is None or not st.has_users:
                return self.base(x)
        elif st is None or st.row_users is None or not st.any_adapter(self.bank):
            return self.base(x)
        plan = st.plan_for(x)
        if not self.dense:  # the base computes itself; the adapters' contribution is added
            y = self.base(x)
            dt = self.bank.lora_a.dtype
            return y + kernels.lora_linear(x.to(dt), None, None, self.bank, plan).to(y.dtype)
        w = self.base_weight()
        bias = cast("torch.Tensor | None", self.base.bias)
        if x.dtype != w.dtype:  # e.g. under autocast: run in the weights' dtype, hand back x's
            return kernels.lora_linear(x.to(w.dtype), w, bias, self.bank, plan).to(x.dtype)
        return kernels.lora_linear(x, w, bias, self.bank, plan)

    def extra_repr(self) -> str:
        return f"layer={self.layer}, target={self.target!r}, conv1d={self.conv1d}, dense={self.dense}"


# --------------------------------------------------------------------------- shared state
@torch.library.custom_op("milp::static_plan_snapshot", mutates_args=())
def _static_plan_snapshot(sorted_tokens: torch.Tensor, tiles: torch.Tensor, segments: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Copies of a static plan's buffers. An op, not ``Tensor.clone``: torch.compile's partitioner
    (inductor's) may recompute a clone in the backward from the static buffers, which would then
    be saved (and rewritten by the next set_users); an op it is not allowed to recompute is saved."""
    return sorted_tokens.clone(), tiles.clone(), segments.clone()


@_static_plan_snapshot.register_fake
def _(sorted_tokens: torch.Tensor, tiles: torch.Tensor, segments: torch.Tensor
      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.empty_like(sorted_tokens), torch.empty_like(tiles), torch.empty_like(segments)


class _PlanSnapshot(BatchPlan):
    """A copy of a static plan's buffers, made inside a compiled forward under autograd (see
    :meth:`MilpState.plan_for`): what the op saves for the backward, which a later
    :meth:`MilpState.set_users` (rewriting the static plan in place) leaves alone.

    Only what the ops read is copied (the buffers, ``max_users``, ``block_ms``): no host value
    that changes with the batch (``num_segments``), which ``torch.compile`` would guard on.
    """

    def __init__(self, plan: BatchPlan) -> None:  # no BatchPlan.__init__: no buffers to allocate
        self.max_tokens = self.num_tokens = plan.max_tokens  # a static plan holds max_tokens tokens
        self.max_users = plan.max_users
        self.max_segments = plan.max_segments
        self.block_ms = plan.block_ms
        self.device = plan.device
        self.num_segments = None  # unknown on the host: the ops choose by token count
        self._tile_offsets = plan._tile_offsets
        self._user_range = plan._user_range
        self.sorted_tokens, self.tiles, self.segments = torch.ops.milp.static_plan_snapshot(
            plan.sorted_tokens, plan.tiles, plan.segments)

    def update(self, token_user: torch.Tensor, *, validate: bool = True,
               num_segments: int | None = None) -> BatchPlan:
        raise RuntimeError("a snapshot of a static plan is read-only: update the static plan")


class MilpState:
    """Per-model injection state: the wrappers, the current batch's users and the plans.

    Obtain it from :func:`apply_milp` or :func:`get_milp`; user ids here are *slots*
    ``0 .. max_users-1`` (the runtime maps its own user keys to slots).

    At most :attr:`max_static_plans` static plans registered by ``generate`` stay registered
    (:meth:`prepare_static` with ``evictable=True``): one more drops the least recently registered.

    Example:
        >>> st = apply_milp(tiny_model("llama"), max_users=2)
        >>> st.num_layers, [m.target for m in st.layers[0]]
        (2, ['mlp.gate_proj', 'mlp.up_proj', 'mlp.down_proj'])
    """

    #: evictable static plans kept registered at most: every set_users rewrites each one, and a server
    #: whose generate registers every batch size and prefill chunk it meets would otherwise pay for all
    #: of them, for good (torch runs the forward eagerly past its recompile limit, 8 graphs, anyway)
    max_static_plans = 64

    def __init__(self, model: nn.Module, layers: list[list[MultiLoraLinear]], max_users: int,
                 names: list[list[str]], requires_grad: dict[str, bool]) -> None:
        self.layers = layers
        self.names = names
        self.max_users = max_users
        config: Any = model.config  # a transformers PretrainedConfig
        self.model_type = str(config.model_type)
        self._requires_grad = requires_grad
        self.row_users: torch.Tensor | None = None  # [B] or [B, S] int64 on CPU
        #: whether users are set (``row_users is not None``): what compiled forwards read
        self.has_users = False
        self._batch_slots: frozenset[int] = frozenset()
        self._num_row_values = 0
        self._version = 0
        self._row_users_dev: dict[torch.device, torch.Tensor] = {}
        self._plans: dict[tuple[torch.device, int], BatchPlan] = {}
        self._plan_keys: dict[tuple[torch.device, int], tuple] = {}
        # (device type, device index, leading shape) -> plan kept current by set_users
        self._static_plans: dict[tuple[str, int | None, tuple[int, ...]], BatchPlan] = {}
        # the keys of evictable plans -> when last registered (prepare_static), for dropping the least
        # recent past max_static_plans; apart from _static_plans, whose order compiled graphs may guard on
        self._static_used: dict[tuple[str, int | None, tuple[int, ...]], int] = {}
        self._static_clock = 0
        self.plan_builds = 0  # number of plan updates (inspection and tests)

    # ----------------------------------------------------------------- info
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def modules(self) -> Iterator[MultiLoraLinear]:
        """Every wrapper, layer by layer."""
        for layer in self.layers:
            yield from layer

    def banks(self) -> list[AdapterBank]:
        return [m.bank for m in self.modules()]

    def target_shapes(self) -> list[list[tuple[int, int]]]:
        return [[(m.in_features, m.out_features) for m in layer] for layer in self.layers]

    def users(self) -> list[int]:
        """Slots that have adapters at some layer."""
        return sorted({u for b in self.banks() for u in b.users})

    def _check_slot(self, slot: object) -> int:
        if isinstance(slot, bool) or not isinstance(slot, int):
            raise TypeError(f"user slot must be an int, got {type(slot).__name__}")
        if not 0 <= slot < self.max_users:
            raise ValueError(f"user slot must be in [0, {self.max_users}) (max_users), got {slot}")
        return slot

    # ----------------------------------------------------------- adapters
    def add_adapters(
        self,
        slot: int,
        layer_ranks: Mapping[int, Sequence[int]],
        lora_alpha: float = 16.0,
        *,
        init: str = "lora",
        generator: torch.Generator | None = None,
    ) -> None:
        """Give ``slot`` modules of ranks ``layer_ranks[l]`` on every target of layer ``l``
        (replacing all its adapters); layers not listed get none.

        Example:
            >>> st = apply_milp(tiny_model("gpt2"), max_users=2)
            >>> st.add_adapters(0, {1: [8, 4]}); st.layers[1][0].bank.rank_of(0)
            12
        """
        self._check_slot(slot)
        if not isinstance(layer_ranks, Mapping):
            raise TypeError(f"layer_ranks must be a mapping {{layer: ranks}}, got {type(layer_ranks).__name__}")
        for li in layer_ranks:
            if isinstance(li, bool) or not isinstance(li, int) or not 0 <= li < self.num_layers:
                raise ValueError(f"layer_ranks keys must be layer indices in [0, {self.num_layers}), got {li!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        # the slot's adapters as they are: put back when the new ones are refused (a rank, the
        # alpha, init) part-way, so a refused call leaves the slot as it was
        saved: list[tuple[AdapterBank, AdapterSegment, torch.Tensor, torch.Tensor]] = []
        for m in self.modules():
            if m.bank.has(slot):
                seg = m.bank.segment(slot)
                wa, wb, _ = m.bank.adapter_weights(slot)
                saved.append((m.bank, seg, wa.detach().clone(), wb.detach().clone()))
        self.remove_adapters(slot, missing_ok=True)
        try:
            for li, layer in enumerate(self.layers):
                ranks = list(layer_ranks.get(li, ()))
                if not ranks:
                    continue
                for m in layer:
                    m.bank.add(slot, ranks, lora_alpha, init=init, generator=generator)
        except BaseException:
            self.remove_adapters(slot, missing_ok=True)
            with torch.no_grad():
                for bank, seg, a, b in saved:
                    bank.add(slot, list(seg.ranks), list(seg.alphas), init="zeros")
                    wa, wb, _ = bank.adapter_weights(slot)
                    wa.copy_(a)
                    wb.copy_(b)
            raise

    def remove_adapters(self, slot: int, *, missing_ok: bool = False) -> None:
        """Drop every adapter of ``slot``.

        Example:
            >>> st = apply_milp(tiny_model("gpt2"), max_users=2)
            >>> st.remove_adapters(1, missing_ok=True)
        """
        self._check_slot(slot)
        _check_bool("missing_ok", missing_ok)
        found = False
        for b in self.banks():
            if b.has(slot):
                b.remove(slot)
                found = True
        if not found and not missing_ok:
            raise KeyError(f"user slot {slot} has no adapters")

    def num_parameters(self, slot: int | None = None) -> int:
        """Adapter parameters of one slot (or of all)."""
        return sum(b.num_parameters(slot) for b in self.banks())

    # ------------------------------------------------------------- users
    def set_users(self, users: torch.Tensor | Sequence[int] | None) -> None:
        """Set the user slot of each batch row (``[B]``) or token (``[B, S]``); ``-1`` = base
        model only; ``None`` clears (every layer then runs its base module alone)."""
        if users is None:
            self._version += 1
            self._row_users_dev.clear()
            self.row_users, self._batch_slots = None, frozenset()
            self.has_users = False
            return
        if isinstance(users, torch.Tensor):
            t = users
        else:
            try:  # a str, a bare int, None entries or ragged rows: no [B] / [B, S] of slots
                t = torch.as_tensor(list(users))
            except (TypeError, ValueError, RuntimeError):
                raise TypeError(f"users must be a [B] or [B, S] sequence (or tensor) of int user slots, "
                                f"got {type(users).__name__} {users!r:.60}") from None
        if t.dim() not in (1, 2) or t.numel() == 0:
            raise ValueError(f"users must be [B] (one slot per row) or [B, S] (per token), got shape {tuple(t.shape)}")
        if t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
            raise TypeError(f"users must hold integer user slots, got dtype {t.dtype}")
        t = t.detach().to("cpu", torch.int64)
        lo, hi = int(t.min()), int(t.max())
        if lo < -1 or hi >= self.max_users:
            raise ValueError(f"users must be slots in [-1, {self.max_users}) (-1 = no adapter), got [{lo}, {hi}]")
        self._version += 1
        self._row_users_dev.clear()
        self.row_users = t.contiguous()
        self.has_users = True
        values = t.unique().tolist()
        self._batch_slots = frozenset(v for v in values if v >= 0)
        self._num_row_values = len(values)  # segments of every plan of this batch (incl. -1)
        self._refresh_static()

    def any_adapter(self, bank: AdapterBank) -> bool:
        """Whether some user of the current batch has adapters in ``bank``."""
        return any(bank.has(u) for u in self._batch_slots)

    def _token_users(self, lead: tuple[int, ...], device: torch.device) -> torch.Tensor:
        ru = self._row_users_dev.get(device)
        if ru is None:
            assert self.row_users is not None  # callers plan only for a batch whose users are set
            ru = self._row_users_dev[device] = self.row_users.to(device)
        T = math.prod(lead)
        if not self._fits(lead):
            if ru.dim() == 2:
                raise ValueError(
                    f"per-token users have shape {tuple(ru.shape)} but the layer input has {T} tokens {lead}"
                )
            raise ValueError(
                f"the layer input's leading shape {list(lead)} does not split into the {ru.shape[0]} batch rows "
                f"whose users were set (batch_users)"
            )
        if ru.dim() == 2:
            return ru.reshape(-1)
        k = lead[0] // ru.shape[0]  # rows per batch row (generate's beams / returned sequences)
        rows = ru if k == 1 else ru.repeat_interleave(k)
        per_row = T // lead[0]
        return rows if per_row == 1 else rows.repeat_interleave(per_row)

    def _fits(self, lead: tuple[int, ...]) -> bool:
        """Whether activations of leading shape ``lead`` can belong to the current batch: as many
        tokens as per-token users, or a first dimension that is a multiple of the rows."""
        ru = self.row_users
        assert ru is not None  # callers test only while the batch's users are set
        if ru.dim() == 2:
            return ru.numel() == math.prod(lead)
        return bool(lead) and lead[0] % ru.shape[0] == 0

    def _refresh_static(self) -> None:
        """Rewrite every registered static plan for the current batch (in place); a shape this
        batch cannot have keeps its old contents, unused."""
        if self.row_users is None:
            return
        for (_, _, lead), plan in self._static_plans.items():
            if self._fits(lead):
                self._update_plan(plan, lead)

    def _update_plan(self, plan: BatchPlan, lead: tuple[int, ...]) -> None:
        with kernels.nvtx_range("milp.plan.update"):
            token_user = self._token_users(lead, plan.device)
            if plan.device.type == "cpu":
                plan.update(token_user)
            else:  # no host sync (CUDA graphs); the segment count is known from set_users
                plan.update(token_user, validate=False, num_segments=self._num_row_values)
        self.plan_builds += 1

    def prepare_static(self, lead: Sequence[int], device: torch.device | str | None = None, *,
                       evictable: bool = False) -> BatchPlan:
        """Register a static plan for activations of leading shape ``lead`` (e.g. ``(B, 1)``
        for the decode steps of ``generate``) on ``device``, for compiled code.

        Under ``torch.compile`` the injected layers do not build plans: they look up the
        static plan of their input's leading shape (a missing one is an error at trace
        time). Every :meth:`set_users` rewrites each registered plan in place, so a
        compiled graph (and a captured CUDA graph) serves any later batch of that shape
        without re-tracing. Registering costs one plan update per ``set_users``. A plan stays
        registered for good, unless ``evictable`` (``generate`` registers its shapes so): past
        :attr:`max_static_plans` evictable shapes the least recently registered one is dropped
        (a compiled graph traced with it needs it registered again, as ``generate`` does before
        every call, and then reads the new plan). Register a shape whose buffers a captured CUDA
        graph reads without ``evictable`` (the default; registering it so pins an evictable
        one). A compiled
        forward under autograd saves a copy of the plan for its backward (one small copy per
        injected layer), so losses of several batches of one shape may be summed before one
        ``backward`` (gradient accumulation); without autograd (decode, serving) the graph reads
        the plan's buffers themselves, with no copy.

        One graph per shape: the lookup by leading shape specializes it, so each registered
        shape traces a graph of its own, also under ``torch.compile(dynamic=True)`` or after
        torch marked the batch dimension dynamic (a model without adapters serves every size
        after its second from one dynamic graph; here 2, 3 and 4 rows are three graphs). Past
        ``torch._dynamo.config.recompile_limit`` graphs (8 by default) torch runs the forward
        eagerly (under ``fullgraph=True``, e.g. ``CompileConfig(fullgraph=True)``, it raises).
        Serve batches of changing size by padding them to a few bucket shapes (extra rows of
        user ``-1``), each registered once. What else re-traces: a user with a larger total
        rank than any before at a layer (the bank's ``max_rank``, an int the op takes) and a
        bank that grows (:meth:`kernels.AdapterBank.reserve`; pass ``capacity`` up front).

        Example:
            >>> st = apply_milp(tiny_model("llama"), max_users=2)
            >>> _ = st.add_adapters(0, {0: (4,)}, init="random")
            >>> plan = st.prepare_static((2, 1))  # registered; filled by every set_users
            >>> st.set_users([0, -1]); plan.token_user_host().tolist()
            [0, -1]
            >>> st.set_users([-1, 0]); plan.token_user_host().tolist()
            [-1, 0]
        """
        if isinstance(lead, int) or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                            for v in lead) or not lead:
            raise ValueError(f"lead must be a non-empty sequence of ints > 0 (the activations' leading shape), "
                             f"got {lead!r}")
        lead = tuple(lead)
        dev = check_device("device", device)
        if dev is None:
            dev = self.layers[0][0].bank.lora_a.device
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        key = (dev.type, dev.index, lead)
        _check_bool("evictable", evictable)
        plan = self._static_plans.get(key)
        known = plan is not None
        if plan is None or plan.max_users != self.max_users:
            plan = self._static_plans[key] = BatchPlan(max(1, math.prod(lead)), self.max_users, device=dev)
        if not evictable:
            self._static_used.pop(key, None)  # pinned: never dropped
        elif not known or key in self._static_used:  # new or evictable already (a pinned one stays pinned)
            self._static_clock += 1
            self._static_used[key] = self._static_clock
            if len(self._static_used) > max(1, self.max_static_plans):
                # the least recently registered evictable shape goes (not this one); a graph traced
                # with it reads the plan registered anew for its shape (generate registers first)
                stale = min(self._static_used, key=self._static_used.__getitem__)
                del self._static_plans[stale], self._static_used[stale]
        if self.row_users is not None:
            if not self._fits(lead):
                raise ValueError(f"leading shape {lead} does not split into the current batch's "
                                 f"{tuple(self.row_users.shape)} users")
            self._update_plan(plan, lead)
        return plan

    def plan_for(self, x: torch.Tensor) -> BatchPlan:
        """The plan of the current batch for activations ``x [..., features]`` (cached;
        under ``torch.compile`` the static plan registered by :meth:`prepare_static`)."""
        lead = tuple(x.shape[:-1])
        if torch.compiler.is_compiling():
            plan = self._static_plans.get((x.device.type, x.device.index, lead))
            if plan is None:
                raise RuntimeError(
                    f"no static plan for activations of leading shape {list(lead)} on {x.device}: under "
                    f"torch.compile call MilpState.prepare_static({lead}) first (MilpRuntime.generate "
                    f"does it for a static cache)"
                )
            # under autograd the op saves the plan for a backward that may come after the next
            # set_users (losses of several batches summed, then one backward) has rewritten the
            # static buffers in place: the graph reads a copy of them instead (a few small int32
            # copies per layer). Without autograd (decode, serving) it reads the buffers themselves:
            # no copies, and a captured CUDA graph sees every later batch. Grad mode is guarded by
            # torch.compile anyway: one graph per shape and grad mode.
            return _PlanSnapshot(plan) if torch.is_grad_enabled() else plan
        T = max(1, math.prod(lead))
        bucket = 1 << (T - 1).bit_length()
        key = (x.device, bucket)
        pkey = (self._version, lead)
        plan = self._plans.get(key)
        if plan is not None and self._plan_keys.get(key) == pkey:
            return plan
        if plan is None or plan.max_users != self.max_users or torch.is_grad_enabled():
            # with autograd on, the last batch's plan may be saved for a backward still to
            # come (losses of several batches summed, then one backward): new buffers then,
            # in-place updates (what CUDA graphs need) only for inference
            plan = self._plans[key] = BatchPlan(bucket, self.max_users, device=x.device)
        self._update_plan(plan, lead)
        self._plan_keys[key] = pkey
        return plan

    def resize_users(self, max_users: int) -> None:
        """Grow the slot space of every bank (and the plans) to ``max_users`` (a smaller one
        changes nothing)."""
        if isinstance(max_users, bool) or not isinstance(max_users, int) or max_users < 1:
            raise ValueError(f"max_users must be an int >= 1, got {max_users!r}")
        if max_users <= self.max_users:
            return
        for b in self.banks():
            b.resize_users(max_users)
        self.max_users = max_users
        self._plans.clear()
        self._plan_keys.clear()
        for key, old in list(self._static_plans.items()):  # same shapes, the wider slot space
            self._static_plans[key] = BatchPlan(old.max_tokens, max_users, device=old.device)
        self._refresh_static()


# --------------------------------------------------------------------------- API
def is_injected(model: nn.Module) -> bool:
    """Whether :func:`apply_milp` has been applied to ``model``.

    Example:
        >>> is_injected(tiny_model("llama"))
        False
    """
    return isinstance(getattr(model, _STATE_ATTR, None), MilpState)


def get_milp(model: nn.Module) -> MilpState:
    """The :class:`MilpState` of an injected model.

    Example:
        >>> m = tiny_model("llama"); st = apply_milp(m); get_milp(m) is st
        True
    """
    st = getattr(model, _STATE_ATTR, None)
    if not isinstance(st, MilpState):
        raise ValueError(f"{type(model).__name__} has no MiLP adapters: call milp.apply_milp(model) first")
    return st


def apply_milp(model: nn.Module, max_users: int = 64, *, capacity: int = 0) -> MilpState:
    """Replace the FFN linears of ``model`` by :class:`MultiLoraLinear` (in place) and freeze
    every base parameter. ``max_users``: size of the user-slot space; ``capacity``: rank
    rows to preallocate per target (the banks grow on demand).

    Example:
        >>> model = tiny_model("roberta")
        >>> st = apply_milp(model, max_users=8)
        >>> type(model.roberta.encoder.layer[0].intermediate.dense).__name__
        'MultiLoraLinear'
    """
    if isinstance(max_users, bool) or not isinstance(max_users, int) or max_users < 1:
        raise ValueError(f"max_users must be an int >= 1, got {max_users!r}")
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
        raise ValueError(f"capacity must be an int >= 0, got {capacity!r}")
    if is_injected(model):
        raise ValueError("model already has MiLP adapters (apply_milp was called); use get_milp(model)")
    targets = ffn_targets(model)
    seen: dict[int, str] = {}
    for row in targets:
        for name, m in row:
            if isinstance(m, MultiLoraLinear):
                raise ValueError(f"{name} is already a MultiLoraLinear")
            if id(m) in seen:  # one wrapper would replace the other: one layer's adapters never run
                raise ValueError(f"{name} is the same module as {seen[id(m)]} (layers sharing FFN modules): "
                                 f"every FFN target needs a module of its own to get its own adapters")
            seen[id(m)] = name
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    # adapters of a quantized base get the model's float dtype (its embeddings', norms'…)
    float_dtype = next((p.dtype for p in model.parameters() if p.dtype.is_floating_point), None)
    for p in model.parameters():
        p.requires_grad_(False)
    layers: list[list[MultiLoraLinear]] = []
    names: list[list[str]] = []
    installed: list[tuple[nn.Module, str, nn.Module]] = []  # (parent, child, original): undone on failure
    try:
        for li, row in enumerate(targets):
            wrapped, row_names = [], []
            for name, m in row:
                parent_name, _, child = name.rpartition(".")
                parent = model.get_submodule(parent_name)
                target = name.split(f".{li}.", 1)[1] if f".{li}." in name else child
                w = MultiLoraLinear(m, max_users, li, target, capacity=capacity, dtype=float_dtype)
                setattr(parent, child, w)
                installed.append((parent, child, m))
                wrapped.append(w)
                row_names.append(name)
            layers.append(wrapped)
            names.append(row_names)
    except BaseException:  # a bank that cannot be built (its dtype, memory): the model as it was
        for parent, child, m in reversed(installed):
            setattr(parent, child, m)
        for n, p in model.named_parameters():
            if n in requires_grad:
                p.requires_grad_(requires_grad[n])
        raise
    state = MilpState(model, layers, max_users, names, requires_grad)
    for w in state.modules():
        w._milp_state = state
    object.__setattr__(model, _STATE_ATTR, state)
    return state


def remove_milp(model: nn.Module) -> nn.Module:
    """Put the original FFN modules back, restore every parameter's ``requires_grad`` and
    drop all adapters; returns ``model``.

    Example:
        >>> model = tiny_model("gpt2"); _ = apply_milp(model)
        >>> type(remove_milp(model).transformer.h[0].mlp.c_fc).__name__
        'Conv1D'
    """
    st = get_milp(model)
    places = []
    for row_names, row in zip(st.names, st.layers):
        for name, w in zip(row_names, row):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            if getattr(parent, child, None) is not w:  # checked for all before any is put back
                raise RuntimeError(f"{name} is no longer the MultiLoraLinear apply_milp installed")
            places.append((parent, child, w))
    for parent, child, w in places:
        setattr(parent, child, w.base)
        w._milp_state = None
    for n, p in model.named_parameters():
        if n in st._requires_grad:
            p.requires_grad_(st._requires_grad[n])
    st.set_users(None)
    object.__delattr__(model, _STATE_ATTR)
    return model


@contextlib.contextmanager
def batch_users(model: nn.Module, users: torch.Tensor | Sequence[int] | None) -> Iterator[MilpState]:
    """Run the forwards inside the block with one user slot per batch row (``[B]``, ``-1`` =
    no adapter) or per token (``[B, S]``); nests, restoring the outer users on exit.

    Example:
        >>> model = tiny_model("llama"); st = apply_milp(model, max_users=2)
        >>> with batch_users(model, [0, 1, -1]):
        ...     out = model(torch.ones(3, 4, dtype=torch.long))
    """
    st = get_milp(model)
    previous = st.row_users
    st.set_users(users)
    try:
        yield st
    finally:
        st.set_users(previous)


# --------------------------------------------------------------------------- tiny models
_TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
_DECODER = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=128, **_TOKENS)
_GQA = dict(_DECODER, num_key_value_heads=2, tie_word_embeddings=False)
_GEMMA = dict(_GQA, head_dim=8)
#: model_type -> (config class, model class, config kwargs, {generic override name: this config's})
_TINY: dict[str, tuple[str, str, dict[str, Any], dict[str, str]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", _GQA, {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", _GQA, {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", _GQA, {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(_GQA, head_dim=8), {}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", _GEMMA, {}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(_GEMMA, query_pre_attn_scalar=8, sliding_window=64), {}),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM",
                    dict(_GEMMA, query_pre_attn_scalar=8, sliding_window=64), {}),
    "olmo": ("OlmoConfig", "OlmoForCausalLM", _GQA, {}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", _GQA, {}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", _GQA, {}),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", _GQA, {}),
    "cohere": ("CohereConfig", "CohereForCausalLM", _GQA, {}),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", _GQA, {}),
    "phi": ("PhiConfig", "PhiForCausalLM", dict(_DECODER, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0), {}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(_GQA, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0), {}),
    "opt": ("OPTConfig", "OPTForCausalLM",
            dict(vocab_size=96, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=128, word_embed_proj_dim=32, dropout=0.0, attention_dropout=0.0, **_TOKENS),
            {"intermediate_size": "ffn_dim"}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM",
                 dict(_DECODER, hidden_dropout=0.0, attention_dropout=0.0, tie_word_embeddings=False), {}),
    "falcon": ("FalconConfig", "FalconForCausalLM",
               dict(vocab_size=96, hidden_size=32, ffn_hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=128, hidden_dropout=0.0, attention_dropout=0.0, **_TOKENS),
               {"intermediate_size": "ffn_hidden_size"}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel",
             dict(vocab_size=96, n_embd=32, n_inner=64, n_layer=2, n_head=4, n_positions=128, resid_pdrop=0.0,
                  embd_pdrop=0.0, attn_pdrop=0.0, **_TOKENS),
             {"num_hidden_layers": "n_layer", "hidden_size": "n_embd", "intermediate_size": "n_inner"}),
    "roberta": ("RobertaConfig", "RobertaForCausalLM",
                dict(_DECODER, max_position_embeddings=130, is_decoder=True, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, pad_token_id=1, bos_token_id=0, eos_token_id=2), {}),
}


def tiny_model(arch: str = "llama", *, seed: int = 0, **overrides: Any) -> nn.Module:
    """A tiny random-init causal LM of a supported architecture (``arch``: a ``model_type`` of
    :data:`SUPPORTED_ARCHITECTURES`; hidden 32, FFN 64, 2 layers, vocab 96), in eval mode and
    float32 — for examples, tests and CPU benchmarks. ``overrides`` go to the config (e.g.
    ``num_hidden_layers=4``; ``hidden_size``/``intermediate_size``/``num_hidden_layers`` are
    renamed where an architecture calls them otherwise).

    Example:
        >>> type(tiny_model("qwen2")).__name__
        'Qwen2ForCausalLM'
    """
    import transformers as tf

    if not isinstance(arch, str) or arch not in _TINY:
        raise ValueError(f"arch must be one of {', '.join(_TINY)}; got {arch!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    config_cls, model_cls, kw, renames = _TINY[arch]
    kw = dict(kw)
    kw.update({renames.get(k, k): v for k, v in overrides.items()})
    config = getattr(tf, config_cls)(**kw)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(tf, model_cls)(config)
    return model.to(torch.float32).eval()  # float32 whatever torch's default dtype
