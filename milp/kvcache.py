"""A key/value cache that grows in place: Hugging Face's ``DynamicCache`` without a copy per step.

``DynamicCache`` appends each step's keys and values to a layer's cache with ``torch.cat``, so
every decode step copies the whole cache of every layer: a batch decoded to ``n`` tokens moves
O(n²) bytes. On a GPU that is the size of the weights' own traffic: 32 rows at 1000 tokens of a
TinyLlama-shaped model (22 layers, 4 key/value heads of 64, bf16) hold 0.72 GB of cache, read
and written once more per step, beside 2.2 GB of weights read.

:class:`GrowingCache` is a ``DynamicCache`` whose layers keep their keys and values in a buffer
with room to spare (``[rows, heads, capacity, dim]``): a step's keys and values are written into
it in place, and attention gets views of the filled part (``keys``/``values``, as before). A full
buffer is reallocated with half as much room again (and at least :data:`MIN_ROOM` columns), so
``n`` tokens copy O(n) bytes in all. ``reach``, where the caller knows it (the longest the cache
can grow: prompt plus ``max_new_tokens``), caps the room, so no buffer outgrows what the batch can
use.

Anything that replaces a layer's ``keys``/``values`` from outside (``generate``'s beam reordering,
offloading) stays correct: the layer takes the new tensors as its content (one copy) at its next
``update``; a ``crop`` (views of the buffer's first columns) costs no copy. Views handed out
before a ``crop`` see the columns the next steps write past it, as the buffer is reused.
With ``rows`` the buffers hold rows to spare as well: :class:`milp.decode.ContinuousBatch` writes
a joining row after the running ones (:meth:`GrowingLayer.append`) and moves the last row into
the place of one that left (:meth:`GrowingLayer.compact`), copying only the rows that change.

Measured (``bench/test_kvcache.py`` is the benchmark): on a 2-core CPU, 16 rows at a 2000-token
context of a 4-layer, hidden-512 LLaMA (a 0.5 GB cache) decode a step in 36 ms against 196 ms
with ``DynamicCache``, the same tokens.

Example:
    >>> import torch
    >>> cache = GrowingCache(reach=40)
    >>> k = torch.zeros(2, 1, 10, 4)
    >>> keys, values = cache.update(k, k, 0)             # a prefill of 10 tokens
    >>> keys.shape[-2], cache.layers[0].capacity          # room for 15 (10 x 1.5) + 16
    (10, 26)
    >>> for _ in range(16):                              # 16 decode steps: no reallocation
    ...     keys, values = cache.update(k[..., :1, :], k[..., :1, :], 0)
    >>> keys.shape[-2], cache.layers[0].capacity, cache.reallocations
    (26, 26, 1)
    >>> keys, values = cache.update(k[..., :1, :], k[..., :1, :], 0)
    >>> keys.shape[-2], cache.layers[0].capacity, cache.reallocations   # capped at reach
    (27, 40, 2)
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

__all__ = ["MIN_ROOM", "GROWTH", "GrowingCache", "GrowingLayer", "SlotCache", "SlotLayer", "cache_argument",
           "slot_cache_step", "stack_rows"]

#: a reallocated buffer holds at least this many columns more than it must
MIN_ROOM = 16
#: ... and at least this factor of what it must hold
GROWTH = 1.5


class GrowingLayer(DynamicLayer):
    """One layer of a :class:`GrowingCache`: keys and values in buffers with room
    (``[row capacity, heads, capacity, dim]``), ``keys``/``values`` views of their rows
    ``[0, rows)`` and filled columns ``[start, end)``."""

    def __init__(self, cache: GrowingCache) -> None:
        super().__init__()
        self._owner = cache
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._n = 0  # rows in use
        self._start = self._end = 0
        self._mine: tuple[torch.Tensor, torch.Tensor] | None = None  # the views last handed out

    @property
    def capacity(self) -> int:
        """Columns the buffers hold past the filled part's start (0: no buffers yet)."""
        return 0 if self._k is None else self._k.shape[-2] - self._start

    @property
    def row_capacity(self) -> int:
        """Rows the buffers hold (0: no buffers yet)."""
        return 0 if self._k is None else self._k.shape[0]

    @property
    def filled(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(keys, values)``, the filled columns (an initialised layer's)."""
        if self.keys is None or self.values is None:
            raise RuntimeError("the layer holds no keys and values yet")
        return self.keys, self.values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``key_states``/``value_states`` (``[rows, heads, tokens, dim]``) in place and
        return the views of all of them (what ``DynamicLayer.update`` returns)."""
        if not self.is_initialized:  # DynamicLayer's lazy_initialization differs across transformers versions
            self.dtype, self.device = key_states.dtype, key_states.device
            self.is_initialized = True
        t = key_states.shape[-2]
        if not self._owns():
            self._adopt(key_states, value_states, t)
        assert self._k is not None and self._v is not None
        if key_states.shape[0] != self._n or value_states.shape[0] != self._n:  # copy_ would broadcast one row
            raise ValueError(f"key_states/value_states must have the cache's {self._n} rows, got "
                             f"{key_states.shape[0]} and {value_states.shape[0]}")
        if self._end + t > self._k.shape[-2]:
            self._move(self._end - self._start + t)
        n, e = self._n, self._end
        self._k[:n, :, e:e + t].copy_(key_states)
        self._v[:n, :, e:e + t].copy_(value_states)
        self._end += t
        return self._views()

    def select(self, rows: torch.Tensor, start: int = 0) -> None:
        """Keep the rows ``rows`` (indices, in that order, repeats allowed) and drop the first
        ``start`` filled columns: one copy of the rows kept, into new buffers with room."""
        if not self.is_initialized:
            return
        if not self._owns():
            self._adopt(*self.filled, 0)
        assert self._k is not None and self._v is not None
        s, e = min(self._start + start, self._end), self._end
        kept_k = self._k[:self._n, :, s:e].index_select(0, rows.to(self._k.device))
        kept_v = self._v[:self._n, :, s:e].index_select(0, rows.to(self._v.device))
        self._rebuffer(kept_k, kept_v, e - s + 1, self._owner.row_room(len(rows)))

    def compact(self, moves: Sequence[tuple[int, int]], rows: int, start: int = 0) -> None:
        """Keep the rows ``[0, rows)``, after copying row ``src`` over row ``dst`` for each
        ``(src, dst)`` of ``moves`` (rows past ``rows`` taking the places of rows that left), and
        drop the first ``start`` filled columns: copies the moved rows only, in place."""
        if not self.is_initialized:
            return
        if not self._owns():
            self._adopt(*self.filled, 0)
        assert self._k is not None and self._v is not None
        if not 0 <= rows <= self._n or any(not (0 <= d < rows <= a < self._n) for a, d in moves):
            raise ValueError(f"compact needs moves from rows >= rows={rows} (of {self._n}) to rows below it, "
                             f"got {list(moves)}")
        s, e = self._start, self._end
        for src, dst in moves:
            self._k[dst, :, s:e].copy_(self._k[src, :, s:e])
            self._v[dst, :, s:e].copy_(self._v[src, :, s:e])
        self._n, self._start = rows, min(self._start + start, self._end)
        self._views()

    def can_append(self, rows: int, length: int) -> bool:
        """Whether :meth:`append` of ``rows`` rows of ``length`` columns fits the buffers as they are."""
        return (self._owns() and self._k is not None and self._n + rows <= self._k.shape[0]
                and length <= self._end - self._start)

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Add the rows ``keys``/``values`` (``[rows, heads, length, dim]``, :meth:`can_append`)
        after the rows held, right-aligned to the filled columns (their left padding zeroed):
        copies the new rows only."""
        if not self.can_append(keys.shape[0], keys.shape[-2]):
            raise ValueError(f"{keys.shape[0]} rows of {keys.shape[-2]} columns do not fit the layer's buffers "
                             f"({self._n} of {self.row_capacity} rows used, {self._end - self._start} columns)")
        assert self._k is not None and self._v is not None
        n, add, s, e = self._n, keys.shape[0], self._start, self._end
        pad = e - keys.shape[-2]  # the new rows' first column
        self._k[n:n + add, :, s:pad].zero_()
        self._v[n:n + add, :, s:pad].zero_()
        self._k[n:n + add, :, pad:e].copy_(keys)
        self._v[n:n + add, :, pad:e].copy_(values)
        self._n += add
        self._views()

    def place(self, keys: torch.Tensor, values: torch.Tensor, length: int, rows: int | None = None) -> None:
        """Make ``keys``/``values`` (``[row capacity, heads, capacity, dim]`` buffers, filled in
        their first ``rows`` rows (``None``: all) and ``length`` columns) this layer's buffers."""
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self._k, self._v, self._start, self._end = keys, values, 0, length
        self._n = keys.shape[0] if rows is None else rows
        self._views()
        self._owner.reallocations += 1

    # ------------------------------------------------------------------ internals
    def _owns(self) -> bool:
        """Whether ``keys``/``values`` are still the views this layer handed out."""
        return self._mine is not None and self.keys is self._mine[0] and self.values is self._mine[1]

    def _views(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self._k is not None and self._v is not None
        self.keys = self._k[:self._n, :, self._start:self._end]
        self.values = self._v[:self._n, :, self._start:self._end]
        self._mine = (self.keys, self.values)
        return self.keys, self.values

    def _adopt(self, key_states: torch.Tensor, value_states: torch.Tensor, more: int) -> None:
        """Take ``keys``/``values`` set from outside (or none yet: shapes from ``key_states``) as
        this layer's content, in buffers with room for ``more`` columns past them."""
        keys, values = self.keys, self.values
        if keys is None or values is None or keys.numel() == 0 and keys.dim() != 4:
            keys = key_states[:, :, :0]
            values = value_states[:, :, :0]
        elif self._k is not None and self._v is not None and _leads(keys, self._k, self._n, self._start) and \
                _leads(values, self._v, self._n, self._start) and keys.shape[-2] == values.shape[-2]:
            self._end = self._start + keys.shape[-2]  # cut short in place (crop): still the buffer's start
            self._views()
            return
        self._rebuffer(keys, values, keys.shape[-2] + more, self._owner.row_room(keys.shape[0]))

    def _move(self, need: int) -> None:
        """Reallocate the buffers with room for ``need`` columns (as many rows), the filled part copied over."""
        assert self._k is not None and self._v is not None
        s, e = self._start, self._end
        self._rebuffer(self._k[:self._n, :, s:e], self._v[:self._n, :, s:e], need, self._k.shape[0])

    def _rebuffer(self, keys: torch.Tensor, values: torch.Tensor, need: int, row_capacity: int) -> None:
        """Copy ``keys``/``values`` (``[rows, heads, length, dim]``) into new buffers of
        ``row_capacity`` rows with room for ``need`` columns, and make them this layer's."""
        rows, length = keys.shape[0], keys.shape[-2]
        k, v = _buffers(keys, values, self._owner.room(need), row_capacity)
        k[:rows, :, :length].copy_(keys)
        v[:rows, :, :length].copy_(values)
        self.place(k, v, length, rows)


class GrowingCache(DynamicCache):
    """A ``DynamicCache`` of :class:`GrowingLayer` layers (see the module doc): pass it as a
    model's or ``generate``'s ``past_key_values`` (``cache`` in transformers 5).

    Args:
        reach: the most columns a layer will hold (prompt plus new tokens); caps a buffer's room.
            ``None``: no cap. May be changed between steps (:class:`milp.decode.ContinuousBatch`
            sets it as rows join and leave).
        rows: the rows a buffer holds at least (``None``: the rows it is given), so that rows
            may join later without a new buffer (:meth:`GrowingLayer.append`; a continuous
            batch's ``max_rows``).

    ``reallocations`` counts the buffers every layer was given (:meth:`GrowingLayer.place`), the
    first ones included.
    """

    def __init__(self, reach: int | None = None, rows: int | None = None) -> None:
        for name, value in (("reach", reach), ("rows", rows)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an int >= 1 or None, got {value!r}")
        # DynamicCache's own init takes no layer class; Cache's only calls it
        Cache.__init__(self, layer_class_to_replicate=self._layer)  # type: ignore[arg-type]
        self.reach, self.rows = reach, rows
        self.reallocations = 0

    def _layer(self) -> GrowingLayer:
        return GrowingLayer(self)

    def room(self, need: int) -> int:
        """Columns to allocate for a buffer that must hold ``need``."""
        room = max(need + MIN_ROOM, int(need * GROWTH))
        return max(need, min(room, self.reach)) if self.reach is not None else room

    @property
    def nbytes(self) -> int:
        """Bytes the layers' buffers hold (room included)."""
        return _buffer_bytes(self.layers)

    def row_room(self, need: int) -> int:
        """Rows to allocate for a buffer that must hold ``need``: at least ``rows``."""
        return max(need, self.rows or 0)


#: every :class:`SlotLayer` by its key: what :func:`slot_cache_step` writes
_SLOT_LAYERS: weakref.WeakValueDictionary[int, SlotLayer] = weakref.WeakValueDictionary()
_SLOT_KEYS = itertools.count()


@torch.library.custom_op("milp::slot_cache_step", mutates_args=())
def slot_cache_step(key_states: torch.Tensor, value_states: torch.Tensor, columns: torch.Tensor, layer: int,
                    width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A decode step's write into a :class:`SlotCache` layer, as compiled code runs it: the layer
    (by its key) gets ``key_states``/``value_states`` (``[rows, heads, 1, dim]``) of its first
    ``rows`` rows at their ``columns``, in place, and the views of their first ``width`` columns
    are returned (what attention reads).

    An opaque op whose write compiled code does not see (its buffers are no argument), as vLLM's
    attention op keeps its key/value cache: a mutation torch sees is functionalized, a new buffer
    the size of the cache written per layer and copied back (in the ``cudagraphs`` backend and,
    for a ``scatter_``, inductor alike), so that every compiled step would copy the whole cache
    twice. Its outputs are views of the layer's buffers (a captured CUDA graph reads them in
    place), used by the step that made them only."""
    x = _SLOT_LAYERS[layer]
    x._write(key_states, value_states, columns)
    assert x._k is not None and x._v is not None
    n = key_states.shape[0]
    return x._k[:n, :, :width], x._v[:n, :, :width]


@slot_cache_step.register_fake
def _slot_cache_step_fake(key_states: torch.Tensor, value_states: torch.Tensor, columns: torch.Tensor, layer: int,
                          width: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = _SLOT_LAYERS[layer]
    assert x._k is not None and x._v is not None
    return tuple(s.new_empty_strided((s.shape[0], s.shape[1], width, s.shape[3]), b.stride())  # type: ignore[return-value]
                 for s, b in ((key_states, x._k), (value_states, x._v)))


class SlotLayer(DynamicLayer):
    """One layer of a :class:`SlotCache`: keys and values in buffers ``[rows, heads, capacity,
    dim]`` allocated once; ``keys``/``values`` are views of their first ``step_rows`` rows and
    ``width`` columns."""

    is_compileable = True

    def __init__(self, cache: SlotCache) -> None:
        super().__init__()
        self._owner = cache
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._key = next(_SLOT_KEYS)
        _SLOT_LAYERS[self._key] = self

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Write each row's key and value (``[rows, heads, 1, dim]``: a decode step of the first
        ``step_rows`` rows) at the row's column (:attr:`SlotCache.columns`), in place, and return
        the views of the first ``width`` columns (what attention reads; the mask hides each row's
        columns past its own). Compiled, through the opaque :func:`slot_cache_step`."""
        o = self._owner
        if self._k is None or self._v is None:
            raise RuntimeError("a SlotCache layer is written by SlotCache.place before its first decode step")
        n = o.step_rows
        if key_states.shape[0] != n or key_states.shape[-2] != 1 or value_states.shape[-2] != 1:
            raise ValueError(f"a SlotCache step takes one token for each of its first step_rows={n} rows, got keys "
                             f"of shape {list(key_states.shape)}")
        if torch.compiler.is_compiling():  # no attribute set: compiled code would make the views graph outputs
            return slot_cache_step(key_states, value_states, o.columns, self._key, o.width)
        self._write(key_states, value_states, o.columns)
        return self._views()

    def _write(self, key_states: torch.Tensor, value_states: torch.Tensor, columns: torch.Tensor) -> None:
        """Each of the first ``rows`` rows' key and value at its column, in place."""
        assert self._k is not None and self._v is not None
        n = key_states.shape[0]
        at = columns[:n].view(-1, 1, 1, 1)
        self._k[:n].scatter_(2, at.expand(key_states.shape), key_states)
        self._v[:n].scatter_(2, at.expand(value_states.shape), value_states)

    def _allocate(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Zeroed buffers of the cache's rows and capacity, with ``keys``' / ``values``' (``[heads,
        length, dim]``) heads, dim, dtype and device, at fixed addresses: a compiled step reads
        them in place, and CUDA graphs do not copy them."""
        o = self._owner
        self._k = keys.new_zeros((o.rows, keys.shape[0], o.capacity, keys.shape[-1]))
        self._v = values.new_zeros((o.rows, values.shape[0], o.capacity, values.shape[-1]))
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        torch._dynamo.mark_static_address(self._k)
        torch._dynamo.mark_static_address(self._v)
        self._views()

    def _views(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self._k is not None and self._v is not None
        n, w = self._owner.step_rows, self._owner.width
        self.keys, self.values = self._k[:n, :, :w], self._v[:n, :, :w]
        return self.keys, self.values


class SlotCache(Cache):
    """A key/value cache of fixed shape for decoding a set of rows whose members change (continuous
    batching with a compiled decode step: :class:`milp.decode.ContinuousBatch`'s ``max_length``).

    Each layer holds buffers ``[rows, heads, capacity, dim]``, allocated at the first
    :meth:`place` and never again. Row ``r`` holds its own tokens in columns ``[0, columns[r])``:
    no left padding, so a row's next position is its column. A decode step (one token per row,
    every row, used or not) writes each row's key and value at ``columns[r]``; attention reads the
    first ``width`` columns of every row, and the caller's mask hides the columns past each row's
    own. A step may run the first ``step_rows`` rows only (the caller keeps its rows there:
    :meth:`place` moves one). The shapes a step sees depend on ``step_rows`` and ``width`` only,
    so a compiled step (and a captured CUDA graph) serves any rows joining and leaving, one graph
    per pair.

    ``columns`` is a device tensor written in place (the caller advances it after each step);
    ``width`` and ``step_rows`` ints the caller sets before each step (``<= capacity``, ``<= rows``).
    Compiled, a step writes through the opaque :func:`slot_cache_step` (the write torch would
    otherwise functionalize into a copy of the whole cache per layer and step: 190 ms a step
    against 13 ms, AOT-traced, for 8 rows of a 268 MB cache on a 2-core CPU).

    Args:
        rows: the rows (slots) the cache holds.
        capacity: the columns each row holds at most (its prompt plus its new tokens).

    Example:
        >>> import torch
        >>> cache = SlotCache(rows=2, capacity=8)
        >>> cache.place(1, [(torch.ones(1, 3, 4), torch.ones(1, 3, 4))])   # a 3-token prefill in row 1
        >>> cache.columns.tolist(), cache.nbytes
        ([0, 3], 512)
        >>> cache.width = 4
        >>> keys, _ = cache.update(torch.full((2, 1, 1, 4), 2.0), torch.zeros(2, 1, 1, 4), 0)  # a step
        >>> keys[1, 0, :, 0].tolist(), keys[0, 0, :, 0].tolist()
        ([1.0, 1.0, 1.0, 2.0], [2.0, 0.0, 0.0, 0.0])
    """

    def __init__(self, rows: int, capacity: int) -> None:
        for name, value in (("rows", rows), ("capacity", capacity)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        Cache.__init__(self, layer_class_to_replicate=self._layer)  # type: ignore[arg-type]
        self.rows, self.capacity, self._width, self._step_rows = rows, capacity, capacity, rows
        self.columns = torch.zeros(rows, dtype=torch.long)

    @property
    def width(self) -> int:
        """The columns attention reads (every layer's ``keys``/``values`` are set to them)."""
        return self._width

    @width.setter
    def width(self, width: int) -> None:
        self.set_step(self._step_rows, width)

    @property
    def step_rows(self) -> int:
        """The rows a step runs: the first ``step_rows`` (every layer's ``keys``/``values`` are
        views of them)."""
        return self._step_rows

    @step_rows.setter
    def step_rows(self, rows: int) -> None:
        self.set_step(rows, self._width)

    def set_step(self, rows: int, width: int) -> None:
        """Set :attr:`step_rows` and :attr:`width` together (what a caller does before each step):
        the layers' views are remade once, and only where either changed."""
        for name, value, most, of in (("step_rows", rows, self.rows, "rows"),
                                      ("width", width, self.capacity, "capacity")):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
                raise ValueError(f"{name} must be an int in [1, {of}={most}], got {value!r}")
        if (rows, width) == (self._step_rows, self._width):
            return
        self._step_rows, self._width = rows, width
        for layer in self.layers:
            if isinstance(layer, SlotLayer) and layer._k is not None:
                layer._views()

    def _layer(self) -> SlotLayer:
        return SlotLayer(self)

    def place(self, row: int, parts: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Make ``parts`` (each layer's ``(keys, values)``, ``[heads, length, dim]``: one row's
        prefill, or another row's :meth:`row`, to move it) row ``row``'s content, in its columns
        ``[0, length)``, and zero the rest of the row (masked columns attention still reads: a NaN
        an earlier row left there would reach the output through its zero weight);
        ``columns[row] = length``. The first call allocates every layer's buffers (zeros) from the
        parts' shapes."""
        if not 0 <= row < self.rows:
            raise ValueError(f"row must be in [0, {self.rows}), got {row}")
        length = parts[0][0].shape[-2] if parts else 0
        if not parts or length > self.capacity:
            raise ValueError(f"place needs every layer's keys and values of at most capacity={self.capacity} "
                             f"columns, got {len(parts)} layers of {length}")
        if not self.layers or any(not isinstance(x, SlotLayer) or x._k is None for x in self.layers):
            self._allocate(parts)
        if len(parts) != len(self.layers):
            raise ValueError(f"place needs the keys and values of the cache's {len(self.layers)} layers, "
                             f"got {len(parts)}")
        for layer, (k, v) in zip(self.layers, parts):
            assert isinstance(layer, SlotLayer) and layer._k is not None and layer._v is not None
            layer._k[row, :, :length].copy_(k)
            layer._v[row, :, :length].copy_(v)
            layer._k[row, :, length:].zero_()
            layer._v[row, :, length:].zero_()
        self.columns[row] = length

    def row(self, row: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Row ``row``'s first ``length`` columns, each layer's ``(keys, values)`` (``[heads,
        length, dim]`` views of the buffers): what :meth:`place` takes, to move a row to another."""
        if not 0 <= row < self.rows or not 0 < length <= self.capacity:
            raise ValueError(f"row must be in [0, {self.rows}) and length in [1, {self.capacity}], got {row}, {length}")
        if not self.layers:
            raise RuntimeError("a SlotCache has no rows to read before its first place")
        parts = []
        for x in self.layers:
            if not isinstance(x, SlotLayer) or x._k is None or x._v is None:
                raise RuntimeError("a SlotCache has no rows to read before its first place")
            parts.append((x._k[row, :, :length], x._v[row, :, :length]))
        return parts

    def _allocate(self, parts: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.layers = []
        for k, v in parts:
            layer = SlotLayer(self)
            layer._allocate(k, v)
            self.layers.append(layer)
        self.columns = self.columns.to(parts[0][0].device)
        torch._dynamo.mark_static_address(self.columns)

    @property
    def nbytes(self) -> int:
        """Bytes the layers' buffers hold."""
        return _buffer_bytes(self.layers)


def cache_argument(model: Any) -> str | None:
    """The name ``model``'s forward (and ``generate``) takes a cache by: ``cache`` in
    transformers 5 (``past_key_values`` is deprecated there), ``past_key_values`` before;
    ``None`` where it takes neither (or its signature cannot be read)."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (AttributeError, TypeError, ValueError):
        return None
    return "cache" if "cache" in params else "past_key_values" if "past_key_values" in params else None


def stack_rows(parts: Sequence[tuple[torch.Tensor, torch.Tensor]], width: int, room: int,
               rows: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Buffers (``[max(rows, rows of parts), heads, room, dim]``) holding the ``(keys, values)``
    of ``parts`` one after another along the rows, each right-aligned to ``width`` columns (left
    padding zeroed, so that masked columns read zeros, never uninitialised memory)."""
    if not parts or width > room:
        raise ValueError(f"stack_rows needs parts and width <= room, got {len(parts)} parts, {width=}, {room=}")
    first_k, first_v = parts[0]
    k, v = _buffers(first_k, first_v, room, max(rows, sum(pk.shape[0] for pk, _ in parts)))
    at = 0
    for pk, pv in parts:
        n, pad = pk.shape[0], width - pk.shape[-2]
        k[at:at + n, :, :pad].zero_()
        v[at:at + n, :, :pad].zero_()
        k[at:at + n, :, pad:width].copy_(pk)
        v[at:at + n, :, pad:width].copy_(pv)
        at += n
    return k, v


def _buffer_bytes(layers: Sequence[Any]) -> int:
    """Bytes of the key and value buffers of ``layers`` (:class:`GrowingLayer` or
    :class:`SlotLayer`; other layers, and buffers not allocated yet, count nothing)."""
    return sum(b.numel() * b.element_size() for x in layers if isinstance(x, (GrowingLayer, SlotLayer))
               for b in (x._k, x._v) if b is not None)


def _leads(t: torch.Tensor, buf: torch.Tensor, rows: int, start: int) -> bool:
    """Whether ``t`` is a view of ``buf``'s first ``rows`` rows, all heads, from column ``start``
    on (what ``crop`` leaves of a layer's keys or values)."""
    return (t.dim() == 4 and t.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
            and t.stride() == buf.stride() and t.shape[0] == rows and t.shape[1] == buf.shape[1]
            and t.shape[3] == buf.shape[3] and t.storage_offset() == buf.storage_offset() + start * buf.stride(2)
            and start + t.shape[2] <= buf.shape[2])


def _buffers(keys: torch.Tensor, values: torch.Tensor, room: int,
             rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Uninitialised buffers of ``room`` columns with ``keys``'/``values``' heads, dim, dtype and
    device, and their rows (or ``rows``)."""
    rows = keys.shape[0] if rows is None else rows
    return (keys.new_empty((rows, keys.shape[1], room, keys.shape[3])),
            values.new_empty((rows, values.shape[1], room, values.shape[3])))
