"""Search spaces for multi-LoRA memory configurations, and the parameter count.

A *configuration* θ says, for every transformer layer ``l`` of the base model, whether the
layer carries adapters (``layer_mask[l]``, the paper's α_l), how many LoRA modules it carries
(``modules[l]``, n_l) and their rank (``ranks[l]``).  The search works in the unit cube
``[0, 1]^d``; a space maps points of the cube to configurations and back.

Spaces
------
* :func:`paper_space` — the paper's space (Table 6): one bit per layer, one module count
  ``n ∈ {0..32}`` and one rank ``r ∈ {8, 16, 32, 64, 96}`` shared by all layers, so
  ``d = L + 2``.
* :func:`extended_space` — a rank per layer (``d = 2L + 1``), optionally a module count per
  layer as well (``d = 3L``).  The kernels pack adapters ragged, so mixed ranks cost nothing.
* :class:`BoxSpace` — a plain continuous box, for test problems such as DTLZ2.

Encoding (exact)
----------------
Every LoRA-space dimension is discrete.  A dimension with ``K`` allowed values (a bit:
``K = 2``; a module count ``lo..hi``: ``K = hi - lo + 1``; the rank set, as an ordinal:
``K = len(ranks)``) is encoded on the grid ``{0, 1/(K-1), ..., 1}``: value index ``k``
becomes ``k / (K - 1)``.  Decoding uses equal-width bins, ``k = min(floor(x K), K - 1)``,
which maps every grid point back to its own index (so ``decode(encode(c)) == c`` exactly)
and maps a *uniform* ``x`` (e.g. a scrambled Sobol point) to a uniform index, so the
initial design covers every value equally often (rounding to the nearest grid point would
give the two end values half the weight).  :meth:`Space.snap` projects a point onto the grid.

Why not relax + round: the acquisition function is optimised with BoTorch's
``optimize_acqf_mixed_alternating`` on exactly this grid (``discrete_dims`` =
:attr:`Space.discrete_values`), so every candidate is a grid point, decodes exactly and
is scored by the acquisition function at the configuration that will actually be
evaluated.  Relaxing and rounding afterwards scores a different point from the one
evaluated, can round ``q`` distinct candidates onto the same configuration, and gives the
32 layer bits gradients that mean nothing.

Parameter count
---------------
:func:`parameter_count` is the single source of truth (the runtime's ``MemoryConfig``
calls it): a LoRA module of rank ``r`` on a linear ``k → d`` has ``r (k + d)`` trainable
parameters (``A: [r, k]``, ``B: [d, r]``); masked-off layers count 0.

This module needs only the standard library; :meth:`SearchSpace.parameter_count_tensor`
imports torch lazily.
"""
from __future__ import annotations

import json
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "PAPER_MODULES",
    "PAPER_RANKS",
    "BoxSpace",
    "LoRAConfig",
    "SearchSpace",
    "Space",
    "extended_space",
    "ffn_target_shapes",
    "paper_space",
    "parameter_count",
]

#: The paper's module-count range (inclusive) and rank set (Table 6).
PAPER_MODULES: tuple[int, int] = (0, 32)
PAPER_RANKS: tuple[int, ...] = (8, 16, 32, 64, 96)


# --------------------------------------------------------------------------- validation
def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _check_int(v: Any, name: str, *, minimum: int | None = None) -> int:
    if not _is_int(v):
        raise TypeError(f"{name} must be an int, got {type(v).__name__} ({v!r})")
    v = int(v)
    if minimum is not None and v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return v


def _check_seq(v: Any, name: str) -> Sequence[Any]:
    if isinstance(v, (str, bytes)) or not isinstance(v, Sequence):
        if hasattr(v, "tolist"):  # numpy arrays / torch tensors
            v = v.tolist()
            if isinstance(v, list):
                return v
        raise TypeError(f"{name} must be a sequence, got {type(v).__name__}")
    return v


def _check_bool(v: Any, name: str) -> bool:
    if isinstance(v, bool):
        return v
    if type(v).__name__ == "bool_":  # numpy.bool_
        return bool(v)
    if _is_int(v) and int(v) in (0, 1):
        return bool(v)
    raise TypeError(f"{name} must be a bool (or 0/1), got {type(v).__name__} ({v!r})")


# ------------------------------------------------------------------ parameter counting
def parameter_count(
    layer_mask: Sequence[bool],
    modules: Sequence[int],
    ranks: Sequence[int | Sequence[int]],
    target_shapes: Sequence[Sequence[tuple[int, int]]],
) -> int:
    """Exact number of trainable LoRA parameters of a multi-LoRA configuration.

    Args:
        layer_mask: ``[L]`` whether layer ``l`` carries adapters (α_l).
        modules: ``[L]`` number of LoRA modules ``n_l >= 0`` at layer ``l``.
        ranks: ``[L]``; ``ranks[l]`` is one int (the rank of all ``n_l`` modules) or a
            sequence of ``n_l`` ints (the rank of each module).  Ranks must be >= 1.
        target_shapes: ``[L]``; ``target_shapes[l]`` lists ``(in_features, out_features)``
            of the FFN target linears of layer ``l`` (LLaMA: gate, up, down).

    Returns:
        ``Σ_l α_l Σ_{j < n_l} r_{l,j} Σ_{(k, d) ∈ target_shapes[l]} (k + d)``.

    Example:
        >>> shapes = [[(4, 8), (4, 8), (8, 4)]] * 2  # two tiny LLaMA-style layers
        >>> parameter_count([True, False], [2, 3], [8, 8], shapes)  # 2 * 8 * 36
        576
        >>> parameter_count([True, True], [2, 1], [[8, 16], 4], shapes)  # (24 + 4) * 36
        1008
    """
    layer_mask = _check_seq(layer_mask, "layer_mask")
    modules = _check_seq(modules, "modules")
    ranks = _check_seq(ranks, "ranks")
    target_shapes = _check_seq(target_shapes, "target_shapes")
    n_layers = len(layer_mask)
    for name, seq in (("modules", modules), ("ranks", ranks), ("target_shapes", target_shapes)):
        if len(seq) != n_layers:
            raise ValueError(
                f"{name} must have one entry per layer: len(layer_mask) = {n_layers}, "
                f"len({name}) = {len(seq)}"
            )
    total = 0
    for layer in range(n_layers):
        on = _check_bool(layer_mask[layer], f"layer_mask[{layer}]")
        n = _check_int(modules[layer], f"modules[{layer}]", minimum=0)
        r = ranks[layer]
        if _is_int(r):
            rank_sum = n * _check_int(r, f"ranks[{layer}]", minimum=1)
        else:
            r = _check_seq(r, f"ranks[{layer}]")
            if len(r) != n:
                raise ValueError(
                    f"ranks[{layer}] lists {len(r)} ranks but modules[{layer}] = {n}; give one "
                    "rank per module or a single int"
                )
            rank_sum = sum(_check_int(v, f"ranks[{layer}][{j}]", minimum=1) for j, v in enumerate(r))
        shapes = _check_seq(target_shapes[layer], f"target_shapes[{layer}]")
        width = 0
        for t, shape in enumerate(shapes):
            shape = _check_seq(shape, f"target_shapes[{layer}][{t}]")
            if len(shape) != 2:
                raise ValueError(
                    f"target_shapes[{layer}][{t}] must be (in_features, out_features), got {shape!r}"
                )
            k = _check_int(shape[0], f"target_shapes[{layer}][{t}][0] (in_features)", minimum=1)
            d = _check_int(shape[1], f"target_shapes[{layer}][{t}][1] (out_features)", minimum=1)
            width += k + d
        if on:
            total += rank_sum * width
    return total


def ffn_target_shapes(
    num_layers: int, hidden_size: int, intermediate_size: int, arch: str = "llama"
) -> list[list[tuple[int, int]]]:
    """The ``(in_features, out_features)`` of the FFN target linears of every layer.

    ``arch`` is ``"llama"`` (gate, up: hidden→ffn; down: ffn→hidden) or ``"gpt2"`` /
    ``"roberta"`` (one up and one down projection).

    Example:
        >>> ffn_target_shapes(2, 576, 1536)[0]
        [(576, 1536), (576, 1536), (1536, 576)]
    """
    num_layers = _check_int(num_layers, "num_layers", minimum=1)
    h = _check_int(hidden_size, "hidden_size", minimum=1)
    f = _check_int(intermediate_size, "intermediate_size", minimum=1)
    if arch == "llama":
        layer = [(h, f), (h, f), (f, h)]
    elif arch in ("gpt2", "roberta"):
        layer = [(h, f), (f, h)]
    else:
        raise ValueError(f"arch must be 'llama', 'gpt2' or 'roberta', got {arch!r}")
    return [list(layer) for _ in range(num_layers)]


# ------------------------------------------------------------------------ configuration
@dataclass(frozen=True)
class LoRAConfig:
    """One memory configuration θ: per layer the on/off bit, module count and rank.

    All fields are plain tuples of length ``L``.  The values are kept as decoded (a
    masked-off layer keeps its module count), so ``decode(encode(c)) == c``;
    :attr:`effective_modules` gives the counts that actually take effect.

    Example:
        >>> c = LoRAConfig(layer_mask=(True, False), modules=(4, 4), ranks=(8, 8))
        >>> c.effective_modules
        (4, 0)
        >>> LoRAConfig.from_json(c.to_json()) == c
        True
    """

    layer_mask: tuple[bool, ...]
    modules: tuple[int, ...]
    ranks: tuple[int, ...]

    def __post_init__(self) -> None:
        mask = _check_seq(self.layer_mask, "layer_mask")
        mods = _check_seq(self.modules, "modules")
        ranks = _check_seq(self.ranks, "ranks")
        if len(mask) == 0:
            raise ValueError("layer_mask must have at least one layer, got an empty sequence")
        for name, seq in (("modules", mods), ("ranks", ranks)):
            if len(seq) != len(mask):
                raise ValueError(
                    f"{name} must have one entry per layer ({len(mask)}), got {len(seq)}"
                )
        object.__setattr__(
            self, "layer_mask", tuple(_check_bool(v, f"layer_mask[{i}]") for i, v in enumerate(mask))
        )
        object.__setattr__(
            self, "modules", tuple(_check_int(v, f"modules[{i}]", minimum=0) for i, v in enumerate(mods))
        )
        object.__setattr__(
            self, "ranks", tuple(_check_int(v, f"ranks[{i}]", minimum=1) for i, v in enumerate(ranks))
        )

    @classmethod
    def uniform(cls, num_layers: int, modules: int, rank: int) -> LoRAConfig:
        """Adapters on every layer, ``modules`` of rank ``rank`` each (the all-layers baseline).

        Example:
            >>> LoRAConfig.uniform(3, modules=2, rank=8).ranks
            (8, 8, 8)
        """
        num_layers = _check_int(num_layers, "num_layers", minimum=1)
        return cls((True,) * num_layers, (modules,) * num_layers, (rank,) * num_layers)

    @property
    def num_layers(self) -> int:
        """Number of layers ``L``."""
        return len(self.layer_mask)

    @property
    def effective_modules(self) -> tuple[int, ...]:
        """Module count per layer with masked-off layers set to 0."""
        return tuple(n if on else 0 for on, n in zip(self.layer_mask, self.modules))

    @property
    def active_layers(self) -> tuple[int, ...]:
        """Indices of the layers that actually carry adapters (mask on and ``n_l > 0``)."""
        return tuple(i for i, n in enumerate(self.effective_modules) if n > 0)

    def parameter_count(self, target_shapes: Sequence[Sequence[tuple[int, int]]]) -> int:
        """:func:`parameter_count` of this configuration.

        Example:
            >>> LoRAConfig.uniform(2, 1, 8).parameter_count(ffn_target_shapes(2, 4, 8))
            576
        """
        return parameter_count(self.layer_mask, self.modules, self.ranks, target_shapes)

    def to_dict(self) -> dict[str, list[Any]]:
        """A JSON-ready dict ``{"layer_mask": [...], "modules": [...], "ranks": [...]}``.

        Example:
            >>> LoRAConfig((True,), (2,), (8,)).to_dict()
            {'layer_mask': [True], 'modules': [2], 'ranks': [8]}
        """
        return {"layer_mask": list(self.layer_mask), "modules": list(self.modules), "ranks": list(self.ranks)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoRAConfig:
        """Inverse of :meth:`to_dict`.

        Example:
            >>> LoRAConfig.from_dict({"layer_mask": [1], "modules": [2], "ranks": [8]}).layer_mask
            (True,)
        """
        if not isinstance(data, Mapping):
            raise TypeError(f"data must be a mapping, got {type(data).__name__}")
        missing = {"layer_mask", "modules", "ranks"} - set(data)
        if missing:
            raise ValueError(f"data is missing the key(s) {sorted(missing)}")
        return cls(*(tuple(_check_seq(data[k], k)) for k in ("layer_mask", "modules", "ranks")))

    def to_json(self) -> str:
        """Compact JSON text of :meth:`to_dict`.

        Example:
            >>> LoRAConfig((False,), (0,), (16,)).to_json()
            '{"layer_mask":[false],"modules":[0],"ranks":[16]}'
        """
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> LoRAConfig:
        """Inverse of :meth:`to_json`.

        Example:
            >>> LoRAConfig.from_json('{"layer_mask":[true],"modules":[1],"ranks":[8]}').modules
            (1,)
        """
        if not isinstance(text, (str, bytes)):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:  # bytes that are not UTF-8 text
            raise ValueError(f"text is not valid JSON: {e}") from None
        return cls.from_dict(data)


# ----------------------------------------------------------------------------- spaces
def _grid(k: int) -> tuple[float, ...]:
    """Unit-cube grid of a dimension with ``k`` values: ``(0, 1/(k-1), ..., 1)``."""
    if k == 1:
        return (0.0,)
    return tuple(i / (k - 1) for i in range(k))


def _to_index(x: float, k: int) -> int:
    """Bin decoding of a unit-cube coordinate to one of ``k`` value indices (see module doc)."""
    if k == 1:
        return 0
    return min(int(math.floor(x * k)), k - 1)


def _check_point(x: Any, dim: int, name: str = "x") -> list[float]:
    if hasattr(x, "detach"):
        x = x.detach().cpu()
    if hasattr(x, "tolist") and not isinstance(x, (list, tuple)):
        x = x.tolist()
    if isinstance(x, (str, bytes)) or not isinstance(x, Sequence):
        raise TypeError(f"{name} must be a 1-D sequence of {dim} floats, got {type(x).__name__}")
    if len(x) != dim:
        raise ValueError(f"{name} must have length {dim} (the space's dimension), got {len(x)}")
    out = []
    for i, v in enumerate(x):
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise TypeError(f"{name}[{i}] must be a real number, got {type(v).__name__} ({v!r})")
        v = float(v)
        if not math.isfinite(v):
            raise ValueError(f"{name}[{i}] must be finite, got {v}")
        out.append(min(max(v, 0.0), 1.0))
    return out


class Space:
    """Common interface of the spaces the search accepts (see :class:`SearchSpace`).

    Subclasses define :attr:`dim`, :attr:`names`, :attr:`discrete_values`, :meth:`encode`,
    :meth:`decode`, :meth:`config_to_dict`, :meth:`config_from_dict` and :meth:`describe`.
    """

    dim: int
    names: tuple[str, ...]
    #: ``{dim index: allowed unit-cube values}`` of the discrete dimensions.
    discrete_values: dict[int, tuple[float, ...]]

    def encode(self, config: Any) -> tuple[float, ...]:  # pragma: no cover - abstract
        raise NotImplementedError

    def decode(self, x: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def config_to_dict(self, config: Any) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def config_from_dict(self, data: Mapping[str, Any]) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def canonical(self, config: Any) -> Any:
        """A hashable key equal for configurations that behave identically (default: ``encode``).

        The search uses it to avoid scoring the same configuration twice.
        """
        return self.encode(config)

    def snap(self, x: Any) -> tuple[float, ...]:
        """Project a unit-cube point onto the space's grid: ``encode(decode(x))``.

        Example:
            >>> paper_space(2).snap([0.7, 0.2, 0.0, 0.99])
            (1.0, 0.0, 0.0, 1.0)
        """
        return self.encode(self.decode(x))

    def decode_many(self, X: Any) -> list[Any]:
        """Decode the rows of a ``[n, d]`` array (list of lists, numpy or torch).

        Example:
            >>> len(paper_space(2).decode_many([[0.0] * 4, [1.0] * 4]))
            2
        """
        if hasattr(X, "detach"):
            X = X.detach().cpu()
        if hasattr(X, "tolist") and not isinstance(X, (list, tuple)):
            X = X.tolist()
        if isinstance(X, (str, bytes)) or not isinstance(X, Sequence):
            raise TypeError(f"X must be a 2-D array of shape [n, {self.dim}], got {type(X).__name__}")
        return [self.decode(row) for row in X]

    def effective_tensor(self, X: torch.Tensor) -> torch.Tensor | None:
        """Map unit-cube points to inputs on which equivalent configurations coincide.

        ``None`` (the default) means the encoding has no such redundancy.  The surrogate
        applies it as an input transform, so the model cannot tell apart configurations
        that behave identically.
        """
        return None

    @property
    def fixed_dims(self) -> dict[int, float]:
        """Dimensions with a single allowed value (held fixed by the optimiser)."""
        return {i: v[0] for i, v in self.discrete_values.items() if len(v) == 1}


class SearchSpace(Space):
    """Multi-LoRA configuration space (the paper's, or extended with per-layer choices).

    Dimensions, in order: ``L`` layer bits (``layer_l``); the module count (``modules``,
    or ``modules_l`` per layer); the rank (``rank``, or ``rank_l`` per layer).  A dimension
    with one allowed value (``modules=(n, n)``, a single rank) is held fixed by the
    optimiser, and ``search_layers=False`` drops the layer bits (every layer on), which gives
    the paper's search-space ablations (Table 4: search only the number, the size, the layers,
    or two of them).

    Args:
        num_layers: number of transformer layers ``L >= 1``.
        modules: inclusive ``(lo, hi)`` range of the module count, ``0 <= lo <= hi``.
        ranks: the allowed ranks (positive ints, no duplicates); searched as an ordinal
            (sorted ascending).
        rank_per_layer: one rank per layer instead of one shared rank.
        modules_per_layer: one module count per layer instead of one shared count.
        target_shapes: optional FFN target shapes per layer (see :func:`parameter_count`),
            needed by :meth:`parameter_count` and :meth:`parameter_count_objective`.
        search_layers: search the per-layer on/off bits (default); ``False``: no layer bits,
            every layer carries adapters.

    Example:
        >>> SearchSpace(4, modules=(2, 2), search_layers=False).names  # only the rank is searched
        ('modules', 'rank')
        >>> space = SearchSpace(4, target_shapes=ffn_target_shapes(4, 8, 16))
        >>> space.dim
        6
        >>> c = space.decode([1, 0, 1, 1, 0.5, 0.25])
        >>> c.layer_mask, c.modules[0], c.ranks[0]
        ((True, False, True, True), 16, 16)
        >>> space.encode(c)
        (1.0, 0.0, 1.0, 1.0, 0.5, 0.25)
    """

    def __init__(
        self,
        num_layers: int,
        *,
        modules: Sequence[int] = PAPER_MODULES,
        ranks: Sequence[int] = PAPER_RANKS,
        rank_per_layer: bool = False,
        modules_per_layer: bool = False,
        target_shapes: Sequence[Sequence[tuple[int, int]]] | None = None,
        search_layers: bool = True,
    ) -> None:
        self.num_layers = _check_int(num_layers, "num_layers", minimum=1)
        self.search_layers = _check_bool(search_layers, "search_layers")
        modules = _check_seq(modules, "modules")
        if len(modules) != 2:
            raise ValueError(f"modules must be an inclusive range (lo, hi), got {tuple(modules)!r}")
        lo = _check_int(modules[0], "modules[0] (lo)", minimum=0)
        hi = _check_int(modules[1], "modules[1] (hi)", minimum=0)
        if hi < lo:
            raise ValueError(f"modules range is inverted: (lo, hi) = ({lo}, {hi}); need lo <= hi")
        self.modules_range: tuple[int, int] = (lo, hi)
        ranks = _check_seq(ranks, "ranks")
        if len(ranks) == 0:
            raise ValueError("ranks must list at least one rank, got an empty sequence")
        checked = []
        for i, r in enumerate(ranks):
            if not _is_int(r):
                raise TypeError(f"ranks[{i}] must be an int, got {type(r).__name__} ({r!r})")
            if int(r) <= 0:
                raise ValueError(f"ranks must be positive, got ranks[{i}] = {int(r)}")
            checked.append(int(r))
        if len(set(checked)) != len(checked):
            raise ValueError(f"ranks must not contain duplicates, got {tuple(checked)!r}")
        self.ranks: tuple[int, ...] = tuple(sorted(checked))
        if not isinstance(rank_per_layer, bool):
            raise TypeError(f"rank_per_layer must be a bool, got {type(rank_per_layer).__name__}")
        if not isinstance(modules_per_layer, bool):
            raise TypeError(f"modules_per_layer must be a bool, got {type(modules_per_layer).__name__}")
        self.rank_per_layer = rank_per_layer
        self.modules_per_layer = modules_per_layer
        shapes: list[list[tuple[int, int]]] | None = None
        if target_shapes is not None:
            shapes = [list(s) for s in _check_seq(target_shapes, "target_shapes")]
            if len(shapes) != self.num_layers:
                raise ValueError(
                    f"target_shapes must have one entry per layer ({self.num_layers}), "
                    f"got {len(shapes)}"
                )
            # validate once through the counting function itself
            parameter_count([True] * self.num_layers, [1] * self.num_layers, [1] * self.num_layers, shapes)
        self.target_shapes = shapes

        L = self.num_layers
        n_bits = L if self.search_layers else 0
        n_mod_dims = L if modules_per_layer else 1
        n_rank_dims = L if rank_per_layer else 1
        self._mod_start = n_bits
        self._rank_start = n_bits + n_mod_dims
        self.dim = n_bits + n_mod_dims + n_rank_dims
        names = [f"layer_{i}" for i in range(n_bits)]
        names += [f"modules_{i}" for i in range(L)] if modules_per_layer else ["modules"]
        names += [f"rank_{i}" for i in range(L)] if rank_per_layer else ["rank"]
        self.names = tuple(names)
        self._n_mod_values = hi - lo + 1
        self._n_rank_values = len(self.ranks)
        dv: dict[int, tuple[float, ...]] = {i: _grid(2) for i in range(n_bits)}
        for i in range(self._mod_start, self._rank_start):
            dv[i] = _grid(self._n_mod_values)
        for i in range(self._rank_start, self.dim):
            dv[i] = _grid(self._n_rank_values)
        self.discrete_values = dv

    def __repr__(self) -> str:
        return (
            f"SearchSpace(num_layers={self.num_layers}, modules={self.modules_range}, ranks={self.ranks}, "
            f"rank_per_layer={self.rank_per_layer}, modules_per_layer={self.modules_per_layer}, "
            f"search_layers={self.search_layers}, dim={self.dim})"
        )

    def describe(self) -> dict[str, Any]:
        """JSON-ready description (stored in the trial log's header to detect a changed space).

        Example:
            >>> paper_space(2).describe()["dim"]
            4
        """
        return {
            "kind": "lora",
            "num_layers": self.num_layers,
            "modules": list(self.modules_range),
            "ranks": list(self.ranks),
            "rank_per_layer": self.rank_per_layer,
            "modules_per_layer": self.modules_per_layer,
            "search_layers": self.search_layers,
            "dim": self.dim,
        }

    # -- encode / decode
    def decode(self, x: Any) -> LoRAConfig:
        """Configuration of a unit-cube point ``x`` (length :attr:`dim`; clipped to [0, 1]).

        Example:
            >>> paper_space(2).decode([1.0, 0.0, 1.0, 0.0])
            LoRAConfig(layer_mask=(True, False), modules=(32, 32), ranks=(8, 8))
        """
        v = _check_point(x, self.dim)
        L = self.num_layers
        mask = tuple(_to_index(v[i], 2) == 1 for i in range(L)) if self.search_layers else (True,) * L
        lo = self.modules_range[0]
        mods = [lo + _to_index(v[i], self._n_mod_values) for i in range(self._mod_start, self._rank_start)]
        ranks = [self.ranks[_to_index(v[i], self._n_rank_values)] for i in range(self._rank_start, self.dim)]
        if not self.modules_per_layer:
            mods = mods * L
        if not self.rank_per_layer:
            ranks = ranks * L
        return LoRAConfig(mask, tuple(mods), tuple(ranks))

    def encode(self, config: LoRAConfig) -> tuple[float, ...]:
        """Unit-cube grid point of a configuration; exact inverse of :meth:`decode`.

        Raises ``ValueError`` when ``config`` is not in the space (wrong layer count, a
        module count outside the range, a rank not in the set, or layers that differ where
        the space shares one value).

        Example:
            >>> paper_space(2).encode(LoRAConfig.uniform(2, modules=16, rank=96))
            (1.0, 1.0, 0.5, 1.0)
        """
        if not isinstance(config, LoRAConfig):
            raise TypeError(f"config must be a LoRAConfig, got {type(config).__name__}")
        if config.num_layers != self.num_layers:
            raise ValueError(f"config has {config.num_layers} layers, the space has {self.num_layers}")
        lo, hi = self.modules_range
        for i, n in enumerate(config.modules):
            if not lo <= n <= hi:
                raise ValueError(f"config.modules[{i}] = {n} is outside the space's range [{lo}, {hi}]")
        for i, r in enumerate(config.ranks):
            if r not in self.ranks:
                raise ValueError(f"config.ranks[{i}] = {r} is not one of the space's ranks {self.ranks}")
        if not self.search_layers and not all(config.layer_mask):
            raise ValueError(
                f"config.layer_mask switches layers off {config.layer_mask} but the space keeps every layer on"
            )
        if not self.modules_per_layer and len(set(config.modules)) != 1:
            raise ValueError(
                f"config.modules differ across layers {config.modules} but the space shares one module count"
            )
        if not self.rank_per_layer and len(set(config.ranks)) != 1:
            raise ValueError(
                f"config.ranks differ across layers {config.ranks} but the space shares one rank"
            )
        bits = _grid(2)
        gm = _grid(self._n_mod_values)
        gr = _grid(self._n_rank_values)
        out = [bits[int(b)] for b in config.layer_mask] if self.search_layers else []
        mods = config.modules if self.modules_per_layer else config.modules[:1]
        ranks = config.ranks if self.rank_per_layer else config.ranks[:1]
        out += [gm[n - lo] for n in mods]
        out += [gr[self.ranks.index(r)] for r in ranks]
        return tuple(out)

    def canonical(self, config: LoRAConfig) -> tuple[tuple[int, int, int], ...]:
        """``(layer, modules, rank)`` of the layers that actually carry adapters.

        Masked-off layers and layers with no module are dropped, so e.g. every
        configuration with ``n = 0`` has the same key ``()``.

        Example:
            >>> s = paper_space(2)
            >>> s.canonical(LoRAConfig((True, False), (0, 0), (8, 8))) == s.canonical(LoRAConfig.uniform(2, 0, 96))
            True
        """
        if not isinstance(config, LoRAConfig):
            raise TypeError(f"config must be a LoRAConfig, got {type(config).__name__}")
        return tuple((i, config.modules[i], config.ranks[i]) for i in config.active_layers)

    def effective_tensor(self, X: torch.Tensor) -> torch.Tensor:
        """Zero out coordinates that cannot matter, so equivalent configurations coincide.

        A layer bit counts only when the layer also gets ``n > 0`` modules; a module count
        only on a layer that is switched on (the shared count: when some layer is active);
        a rank only where some module uses it (the shared rank: when some layer is
        active).  So every configuration without an adapter (``n = 0``, or no layer
        switched on) maps to the all-zero point, and configurations that differ only in
        such coordinates map to one point: the surrogate learns each configuration once,
        and the acquisition sees no gain in "re-scoring" an equivalent one.  Exact (a grid
        point maps to a grid point, two grid points coincide iff :meth:`canonical` says
        they are equivalent) and piecewise linear in between (the ``n > 0`` gate is
        ``clamp(n, 0, 1)``), so a continuous relaxation keeps a gradient.

        Example:
            >>> import torch
            >>> s = paper_space(3)
            >>> X = torch.tensor([[1.0, 0.0, 1.0, 0.0, 0.5], [0.0, 1.0, 1.0, 0.0, 1.0],
            ...                   [0.0, 0.0, 0.0, 1.0, 1.0], [1.0, 0.0, 1.0, 0.5, 0.5]], dtype=torch.float64)
            >>> s.effective_tensor(X).tolist()  # n = 0 or no layer on: nothing else matters
            [[0.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 1.0, 0.5, 0.5]]
        """
        import torch

        if not isinstance(X, torch.Tensor):
            raise TypeError(f"X must be a torch.Tensor, got {type(X).__name__}")
        if X.dim() == 0 or X.shape[-1] != self.dim:
            raise ValueError(f"X must have last dimension {self.dim}, got shape {tuple(X.shape)}")
        lo, hi = self.modules_range
        bits = self._bits(X)
        mods = X[..., self._mod_start : self._rank_start]  # [..., 1 or L]
        ranks = X[..., self._rank_start :]  # [..., 1 or L]
        nonzero = torch.clamp(lo + mods * (hi - lo), 0.0, 1.0)  # [..., 1 or L]: the n > 0 gate
        active = bits * nonzero  # [..., L]
        any_active = active.amax(-1, keepdim=True)  # [..., 1]
        mods = mods * (bits if self.modules_per_layer else any_active)
        ranks = ranks * (active if self.rank_per_layer else any_active)
        return torch.cat([active if self.search_layers else active[..., :0], mods, ranks], dim=-1)

    def _bits(self, X: torch.Tensor) -> torch.Tensor:
        """The layer bits of ``X [..., d]`` as ``[..., L]`` (ones where the space has none)."""
        import torch

        if self.search_layers:
            return X[..., : self.num_layers]
        return torch.ones((*X.shape[:-1], self.num_layers), dtype=X.dtype, device=X.device)

    def config_to_dict(self, config: LoRAConfig) -> dict[str, Any]:
        """``config.to_dict()`` (the search's log format)."""
        return config.to_dict()

    def config_from_dict(self, data: Mapping[str, Any]) -> LoRAConfig:
        """``LoRAConfig.from_dict(data)``."""
        return LoRAConfig.from_dict(data)

    # -- parameter count
    def _shapes(self) -> list[list[tuple[int, int]]]:
        if self.target_shapes is None:
            raise ValueError("target_shapes was not given to the SearchSpace; pass target_shapes=...")
        return self.target_shapes

    def parameter_count(self, config: LoRAConfig) -> int:
        """:func:`parameter_count` of ``config`` with the space's ``target_shapes``.

        Example:
            >>> s = paper_space(2, target_shapes=ffn_target_shapes(2, 4, 8))
            >>> s.parameter_count(LoRAConfig.uniform(2, modules=1, rank=8))
            576
        """
        return config.parameter_count(self._shapes())

    def parameter_count_tensor(self, X: torch.Tensor) -> torch.Tensor:
        """Vectorised :meth:`parameter_count` of unit-cube points ``X [..., d]`` → ``[...]``.

        Same bin decoding as :meth:`decode`; exact for counts below 2**53 in float64.

        Example:
            >>> import torch
            >>> s = paper_space(2, target_shapes=ffn_target_shapes(2, 4, 8))
            >>> s.parameter_count_tensor(torch.tensor([[1.0, 1.0, 1 / 32, 0.0]], dtype=torch.float64))
            tensor([576.], dtype=torch.float64)
        """
        import torch

        if not isinstance(X, torch.Tensor):
            raise TypeError(f"X must be a torch.Tensor, got {type(X).__name__}")
        if X.dim() == 0 or X.shape[-1] != self.dim:
            raise ValueError(f"X must have last dimension {self.dim}, got shape {tuple(X.shape)}")
        X = X.clamp(0.0, 1.0)

        def index(v: torch.Tensor, k: int) -> torch.Tensor:
            if k == 1:
                return torch.zeros_like(v)
            return torch.clamp(torch.floor(v * k), max=k - 1)

        widths = torch.tensor(
            [sum(k + d for k, d in layer) for layer in self._shapes()], dtype=X.dtype, device=X.device
        )
        mask = index(self._bits(X), 2)
        mods = self.modules_range[0] + index(X[..., self._mod_start : self._rank_start], self._n_mod_values)
        rank_values = torch.tensor(self.ranks, dtype=X.dtype, device=X.device)
        ranks = rank_values[index(X[..., self._rank_start :], self._n_rank_values).long()]
        return (mask * mods * ranks * widths).sum(-1)

    def parameter_count_relaxed(self, X: torch.Tensor) -> torch.Tensor:
        """A differentiable extension of :meth:`parameter_count_tensor`, equal to it on the grid.

        Bits enter as their value, the module count as ``lo + x (hi - lo)`` and the rank by
        piecewise-linear interpolation of the sorted rank set; the acquisition optimiser's
        continuous relaxation uses it (the exact count is piecewise constant).

        Example:
            >>> import torch
            >>> s = paper_space(2, target_shapes=ffn_target_shapes(2, 4, 8))
            >>> X = torch.tensor([[1.0, 0.0, 1 / 32, 0.0], [1.0, 1.0, 0.5, 0.125]], dtype=torch.float64)
            >>> s.parameter_count_relaxed(X).tolist()  # on the grid; then halfway between ranks 8 and 16
            [288.0, 13824.0]
        """
        import torch

        if not isinstance(X, torch.Tensor):
            raise TypeError(f"X must be a torch.Tensor, got {type(X).__name__}")
        if X.dim() == 0 or X.shape[-1] != self.dim:
            raise ValueError(f"X must have last dimension {self.dim}, got shape {tuple(X.shape)}")
        X = X.clamp(0.0, 1.0)
        widths = torch.tensor(
            [sum(k + d for k, d in layer) for layer in self._shapes()], dtype=X.dtype, device=X.device
        )
        lo, hi = self.modules_range
        mods = lo + X[..., self._mod_start : self._rank_start] * (hi - lo)
        rank_values = torch.tensor(self.ranks, dtype=X.dtype, device=X.device)
        K = len(self.ranks)
        if K == 1:
            ranks = rank_values[0].expand(X[..., self._rank_start :].shape)
        else:
            u = X[..., self._rank_start :] * (K - 1)
            i0 = torch.clamp(torch.floor(u).detach(), max=K - 2).long()
            frac = u - i0.to(u.dtype)
            ranks = rank_values[i0] * (1 - frac) + rank_values[i0 + 1] * frac
        return (self._bits(X) * mods * ranks * widths).sum(-1)

    def parameter_count_objective(self, name: str = "parameters") -> Any:
        """A known (not modelled) objective that minimises the parameter count.

        Its value is computed from the configuration, so the search fits no surrogate
        for it (see :class:`search.Objective`).

        Example:
            >>> obj = paper_space(2, target_shapes=ffn_target_shapes(2, 4, 8)).parameter_count_objective()
            >>> obj.name, obj.direction
            ('parameters', 'minimize')
        """
        from .objectives import Objective

        self._shapes()
        return Objective(
            name, "minimize", known=self.parameter_count_tensor, known_relaxed=self.parameter_count_relaxed
        )


def paper_space(
    num_layers: int,
    *,
    modules: Sequence[int] = PAPER_MODULES,
    ranks: Sequence[int] = PAPER_RANKS,
    target_shapes: Sequence[Sequence[tuple[int, int]]] | None = None,
    search_layers: bool = True,
) -> SearchSpace:
    """The paper's space (Table 6): ``L`` layer bits + one module count + one rank (``d = L + 2``;
    ``d = 2`` with ``search_layers=False``).

    Example:
        >>> paper_space(32).dim, paper_space(32, search_layers=False).dim
        (34, 2)
    """
    return SearchSpace(num_layers, modules=modules, ranks=ranks, target_shapes=target_shapes,
                       search_layers=search_layers)


def extended_space(
    num_layers: int,
    *,
    modules: Sequence[int] = PAPER_MODULES,
    ranks: Sequence[int] = PAPER_RANKS,
    modules_per_layer: bool = False,
    target_shapes: Sequence[Sequence[tuple[int, int]]] | None = None,
    search_layers: bool = True,
) -> SearchSpace:
    """A rank per layer (``d = 2L + 1``), and optionally a module count per layer (``d = 3L``).

    Example:
        >>> extended_space(32).dim, extended_space(32, modules_per_layer=True).dim
        (65, 96)
    """
    return SearchSpace(
        num_layers,
        modules=modules,
        ranks=ranks,
        rank_per_layer=True,
        modules_per_layer=modules_per_layer,
        target_shapes=target_shapes,
        search_layers=search_layers,
    )


class BoxSpace(Space):
    """A continuous box ``Π [lo_i, hi_i]``; configurations are tuples of floats.

    Args:
        bounds: one ``(lo, hi)`` per dimension with finite ``lo < hi``.
        names: optional dimension names (default ``x0, x1, ...``).

    Example:
        >>> s = BoxSpace([(0.0, 2.0), (-1.0, 1.0)])
        >>> s.decode([0.5, 0.5])
        (1.0, 0.0)
        >>> s.encode((1.0, 0.0))
        (0.5, 0.5)
    """

    def __init__(self, bounds: Sequence[tuple[float, float]], names: Sequence[str] | None = None) -> None:
        bounds = _check_seq(bounds, "bounds")
        if len(bounds) == 0:
            raise ValueError("bounds must have at least one (lo, hi) pair, got an empty sequence")
        checked = []
        for i, b in enumerate(bounds):
            pair = _check_seq(b, f"bounds[{i}]")
            if len(pair) != 2:
                raise ValueError(f"bounds[{i}] must be a (lo, hi) pair, got {tuple(pair)!r}")
            lo, hi = pair
            for v, what in ((lo, "lo"), (hi, "hi")):
                if isinstance(v, bool) or not isinstance(v, numbers.Real):
                    raise TypeError(f"bounds[{i}] {what} must be a real number, got {type(v).__name__}")
                if not math.isfinite(float(v)):
                    raise ValueError(f"bounds[{i}] {what} must be finite, got {v}")
            lo, hi = float(lo), float(hi)
            if hi < lo:
                raise ValueError(f"bounds[{i}] is inverted: (lo, hi) = ({lo}, {hi}); need lo < hi")
            if hi == lo:
                raise ValueError(f"bounds[{i}] is empty: lo == hi == {lo}; need lo < hi")
            checked.append((lo, hi))
        self.bounds = tuple(checked)
        self.dim = len(checked)
        if names is None:
            names = [f"x{i}" for i in range(self.dim)]
        names = tuple(_check_seq(names, "names"))
        if len(names) != self.dim:
            raise ValueError(f"names must have {self.dim} entries, got {len(names)}")
        self.names = names
        self.discrete_values = {}

    def __repr__(self) -> str:
        return f"BoxSpace(bounds={list(self.bounds)})"

    def describe(self) -> dict[str, Any]:
        """JSON-ready description."""
        return {"kind": "box", "bounds": [list(b) for b in self.bounds], "dim": self.dim}

    def decode(self, x: Any) -> tuple[float, ...]:
        """Point of the box for a unit-cube point (clipped to [0, 1])."""
        v = _check_point(x, self.dim)
        # ``lo + u (hi - lo)`` can round past ``hi`` (-0.1 + 1.0 * 0.30000000000000004); keep the
        # point in the box, so that ``encode(decode(x))`` never calls it out of bounds.
        return tuple(
            hi if u == 1.0 else min(max(lo + u * (hi - lo), lo), hi) for u, (lo, hi) in zip(v, self.bounds)
        )

    def encode(self, config: Sequence[float]) -> tuple[float, ...]:
        """Unit-cube point of a point of the box (``ValueError`` outside the box)."""
        v = _check_seq(config, "config")
        if len(v) != self.dim:
            raise ValueError(f"config must have length {self.dim}, got {len(v)}")
        out = []
        for i, (c, (lo, hi)) in enumerate(zip(v, self.bounds)):
            if isinstance(c, bool) or not isinstance(c, numbers.Real):
                raise TypeError(f"config[{i}] must be a real number, got {type(c).__name__} ({c!r})")
            c = float(c)
            if not (lo <= c <= hi):
                raise ValueError(f"config[{i}] = {c} is outside the bounds [{lo}, {hi}]")
            out.append((c - lo) / (hi - lo))
        return tuple(out)

    def snap(self, x: Any) -> tuple[float, ...]:
        """Continuous space: clip to the unit cube."""
        return tuple(_check_point(x, self.dim))

    def config_to_dict(self, config: Sequence[float]) -> dict[str, Any]:
        """``{"x": [...]}``."""
        return {"x": [float(c) for c in config]}

    def config_from_dict(self, data: Mapping[str, Any]) -> tuple[float, ...]:
        """Inverse of :meth:`config_to_dict`."""
        if not isinstance(data, Mapping):
            raise TypeError(f"data must be a mapping with key 'x', got {type(data).__name__}")
        if "x" not in data:
            raise ValueError("data must be a mapping with key 'x'")
        x = _check_seq(data["x"], "data['x']")
        if len(x) != self.dim:
            raise ValueError(f"data['x'] must have length {self.dim} (the space's dimension), got {len(x)}")
        for i, v in enumerate(x):
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise TypeError(f"data['x'][{i}] must be a real number, got {type(v).__name__} ({v!r})")
            if not math.isfinite(float(v)):
                raise ValueError(f"data['x'][{i}] must be finite, got {v}")
        return tuple(float(v) for v in x)
