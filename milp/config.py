"""``MemoryConfig`` (θ): which FFN layers of a model get a user's memory adapters, how many
LoRA modules each, and of what rank.

A layer ``l`` is *active* when ``layer_mask[l]`` is on and ``modules[l] > 0``; each FFN
target linear of an active layer (LLaMA ``gate_proj/up_proj/down_proj``, GPT-2
``c_fc/c_proj``, RoBERTa ``intermediate.dense/output.dense``) then gets ``modules[l]``
modules with ranks ``ranks[l]`` (one rank shared by the layer's modules, or one per
module), each scaled by ``lora_alpha / r_j`` (paper eq. 1).

Example:
    >>> cfg = MemoryConfig.uniform(num_layers=4, modules=2, rank=8)
    >>> cfg.layer_ranks(0)
    (8, 8)
    >>> MemoryConfig.from_json(cfg.to_json()) == cfg
    True
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import numbers
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard, Union

__all__ = ["MAX_MODULES", "MemoryConfig", "RankSpec", "atomic_directory", "atomic_write_bytes", "atomic_write_text"]

#: Most LoRA modules one layer may hold (paper Table 6: ``n ∈ {0..32}``).
MAX_MODULES = 32
_FORMAT = "milp.MemoryConfig/1"

#: Per-layer rank: one int for all of the layer's modules, or one int per module.
RankSpec = Union[int, tuple[int, ...]]


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file and a rename (never half-written):
    :func:`search.trial_log.atomic_write_bytes`, which gives a new file mode ``0o644`` and keeps a
    replaced one's.

    Example:
        >>> import tempfile; d = tempfile.mkdtemp()
        >>> atomic_write_bytes(os.path.join(d, "x.bin"), b"hi").read_bytes()
        b'hi'
    """
    from search.trial_log import atomic_write_bytes as write  # stdlib only; keeps `import milp` light

    _check_path("path", path)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes, got {type(data).__name__} (atomic_write_text writes a str)")
    write(path, data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """:func:`atomic_write_bytes` for UTF-8 text.

    Example:
        >>> import tempfile; d = tempfile.mkdtemp()
        >>> atomic_write_text(os.path.join(d, "x.txt"), "hi").read_text()
        'hi'
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__} (atomic_write_bytes writes bytes)")
    return atomic_write_bytes(path, text.encode("utf-8"))


def _safetensors_bytes(tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> bytes:
    """``safetensors.torch.save(tensors, metadata)`` with the metadata's keys sorted: safetensors
    writes them from a Rust hash map, in an order drawn anew in every process, so two runs that
    saved the same tensors and metadata wrote files with other bytes (another checksum).

    Example:
        >>> import torch
        >>> data = _safetensors_bytes({"w": torch.zeros(1)}, {"user": "u", "format": "f"})
        >>> data[8:48]
        b'{"__metadata__":{"format":"f","user":"u"'
    """
    from safetensors.torch import save

    data = save(dict(tensors), metadata=None if metadata is None else dict(metadata))
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    meta = header.get("__metadata__")
    if not meta or len(meta) < 2:
        return data
    header["__metadata__"] = dict(sorted(meta.items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the tensor data starts 8-byte aligned, as safetensors pads it
    return len(text).to_bytes(8, "little") + text + data[8 + n :]


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``path``; when the block succeeds it replaces
    ``path``, otherwise it is removed, so ``path`` never holds a half-written set of files.

    An older ``path`` is swapped for the new folder in one atomic rename (Linux's
    ``RENAME_EXCHANGE``), then deleted: another process finds a complete folder at ``path`` at
    every moment, and of two processes writing ``path`` at once the last rename wins, whole.
    Where the file system cannot exchange, the older folder is moved away first (put back if the
    final rename fails): ``path`` is then missing between the two renames. An exception from the
    block or before the rename leaves ``path`` as it was; one that interrupts the folder's fsync
    after the rename (only a ``KeyboardInterrupt`` or the like: an ``OSError`` there is ignored)
    propagates with the new folder already, and wholly, in place.

    Example:
        >>> d = Path(tempfile.mkdtemp()) / "user"
        >>> with atomic_directory(d) as tmp:
        ...     _ = (tmp / "a.txt").write_text("x")
        >>> sorted(p.name for p in d.iterdir())
        ['a.txt']
    """
    _check_path("path", path)
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{str(path)!r} exists and is not a directory")
    made = [p for p in (path.parent, *path.parent.parents) if not p.exists()]  # deepest first
    path.parent.mkdir(parents=True, exist_ok=True)
    old = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    except BaseException:
        _remove_empty(made)
        raise
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a result folder is an ordinary one
        yield tmp
        _fsync_tree(tmp)  # the files are on disk before the rename publishes them
        swapped = _publish_directory(tmp, path)
        if swapped is None:  # no RENAME_EXCHANGE here
            if path.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
                os.replace(path, old / "d")
            os.replace(tmp, path)
    except BaseException:
        if old is not None:
            moved = old / "d"
            if moved.exists() and not path.exists():  # the final rename failed: put the old one back
                with contextlib.suppress(OSError):
                    os.replace(moved, path)
            if not moved.exists():  # never delete the previous directory unless it is back in place
                shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(made)  # a failed first write into a new nested path leaves no empty folders
        raise
    from search.trial_log import fsync_dir  # stdlib only

    try:
        fsync_dir(path.parent)  # the rename survives a power loss
    finally:  # published either way: the previous folder goes, also when the fsync fails
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        if swapped:  # tmp holds the previous path now
            if tmp.is_symlink():
                tmp.unlink()
            else:
                shutil.rmtree(tmp, ignore_errors=True)


def _publish_directory(tmp: Path, path: Path) -> bool | None:
    """Rename the folder ``tmp`` to ``path``: ``True`` when it was swapped with an existing
    ``path`` (``tmp`` then holds that one), ``False`` when ``path`` did not exist, ``None`` (and
    nothing renamed) when this file system cannot swap folders."""
    for _ in range(100):  # path appears and goes only by other writers' renames: a few rounds at most
        swapped = _swap_directories(tmp, path)
        if swapped is not False:
            return swapped
        try:
            os.replace(tmp, path)
            return False
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            # another writer published path since the swap found none: swap with that one
    raise OSError(errno.EBUSY, "other processes kept replacing the folder; not published", str(path))


_renameat2: Any = None


def _swap_directories(a: Path, b: Path) -> bool | None:
    """Exchange the folders ``a`` and ``b`` in one atomic rename (``renameat2`` with
    ``RENAME_EXCHANGE``): ``True`` when swapped, ``False`` when ``b`` does not exist, ``None``
    where the platform or file system cannot (not Linux, an old C library, NFS)."""
    import ctypes

    global _renameat2
    if _renameat2 is None:
        _renameat2 = False
        if sys.platform.startswith("linux"):
            with contextlib.suppress(OSError, AttributeError):
                fn = ctypes.CDLL(None, use_errno=True).renameat2
                fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
                fn.restype = ctypes.c_int
                _renameat2 = fn
    if _renameat2 is False:
        return None
    at_fdcwd, rename_exchange = -100, 2
    if _renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err == errno.ENOENT and os.path.lexists(a):
        return False
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return None
    raise OSError(err, os.strerror(err), str(b))


def _check_path(name: str, path: object) -> None:
    """A ``TypeError`` naming ``name`` unless ``path`` is a str or ``os.PathLike`` (pathlib's own
    error names no argument)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path (str or os.PathLike), got {type(path).__name__}")


def _check_bool(name: str, value: object) -> None:
    """A flag: ``"no"`` or ``0`` would be taken by truthiness, not refused."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")


def _remove_empty(folders: Sequence[Path]) -> None:
    """Remove ``folders`` (deepest first) while they are empty: the ones a failed call made."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty (someone else wrote there meanwhile) or already gone
            if folder.exists():
                return


def _fsync_tree(root: Path) -> None:
    """Sync every file under ``root``, then its folders (deepest first)."""
    from search.trial_log import fsync_dir  # stdlib only

    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(folder)


def _is_int(v: object) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool)


def _norm_rank(li: int, r: object, n: int) -> RankSpec:
    if _is_int(r):
        if r <= 0:
            raise ValueError(f"ranks[{li}] must be a positive int, got {r}")
        return int(r)
    if isinstance(r, Sequence) and not isinstance(r, (str, bytes)):
        rs = tuple(r)
        for j, v in enumerate(rs):
            if not _is_int(v):
                raise TypeError(f"ranks[{li}][{j}] must be an int, got {type(v).__name__}")
            if v <= 0:
                raise ValueError(f"ranks[{li}][{j}] must be a positive int, got {v}")
        if len(rs) != n:
            raise ValueError(
                f"ranks[{li}] lists {len(rs)} per-module ranks but modules[{li}] = {n}; "
                f"give one rank per module or a single int"
            )
        return tuple(int(v) for v in rs)
    raise TypeError(f"ranks[{li}] must be an int or a sequence of ints, got {type(r).__name__}")


@dataclass(frozen=True)
class MemoryConfig:
    """One user's memory-adapter configuration θ (immutable, hashable, validated).

    Args:
        layer_mask: per layer, whether it gets adapters (``α_l``).
        modules: per layer, the number of LoRA modules ``n_l`` in ``0..32``.
        ranks: per layer, one rank for all its modules or a tuple of one rank per module.
        lora_alpha: ``α`` of ``s_j = α / r_j``.

    Example:
        >>> cfg = MemoryConfig(layer_mask=(True, False), modules=(2, 0), ranks=((8, 16), 8))
        >>> cfg.active_layers, cfg.layer_ranks(0), cfg.layer_ranks(1)
        ((0,), (8, 16), ())
    """

    layer_mask: tuple[bool, ...]
    modules: tuple[int, ...]
    ranks: tuple[RankSpec, ...]
    lora_alpha: float = 16.0

    def __post_init__(self) -> None:
        for name in ("layer_mask", "modules", "ranks"):
            v = getattr(self, name)
            if isinstance(v, (str, bytes)) or not isinstance(v, Sequence):
                raise TypeError(f"{name} must be a sequence with one entry per layer, got {type(v).__name__}")
        mask = tuple(self.layer_mask)
        for li, m in enumerate(mask):
            if not isinstance(m, (bool, int)) or (not isinstance(m, bool) and m not in (0, 1)):
                raise TypeError(f"layer_mask[{li}] must be a bool (or 0/1), got {m!r}")
        mask = tuple(bool(m) for m in mask)
        L = len(mask)
        if L == 0:
            raise ValueError("layer_mask must name at least one layer")
        if len(self.modules) != L:
            raise ValueError(f"modules has {len(self.modules)} entries but layer_mask has {L} layers")
        if len(self.ranks) != L:
            raise ValueError(f"ranks has {len(self.ranks)} entries but layer_mask has {L} layers")
        modules = []
        for li, n in enumerate(self.modules):
            if not _is_int(n):
                raise TypeError(f"modules[{li}] must be an int, got {type(n).__name__}")
            if not 0 <= n <= MAX_MODULES:
                raise ValueError(f"modules[{li}] must be in [0, {MAX_MODULES}], got {n}")
            modules.append(int(n))
        ranks = tuple(_norm_rank(li, r, n) for li, (r, n) in enumerate(zip(self.ranks, modules)))
        alpha = self.lora_alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            raise TypeError(f"lora_alpha must be a number, got {type(alpha).__name__}")
        try:
            finite = math.isfinite(alpha)
        except OverflowError:  # an int beyond the float range
            finite = False
        if not finite or alpha <= 0:
            shown = alpha if isinstance(alpha, float) or abs(alpha) < 10**18 else "an int beyond the float range"
            raise ValueError(f"lora_alpha must be a finite number > 0, got {shown}")
        object.__setattr__(self, "layer_mask", mask)
        object.__setattr__(self, "modules", tuple(modules))
        object.__setattr__(self, "ranks", ranks)
        object.__setattr__(self, "lora_alpha", float(alpha))

    # ------------------------------------------------------------ constructors
    @classmethod
    def uniform(cls, num_layers: int, modules: int = 1, rank: int = 8, lora_alpha: float = 16.0) -> MemoryConfig:
        """All ``num_layers`` layers on, each with ``modules`` modules of rank ``rank``.

        Example:
            >>> MemoryConfig.uniform(2, modules=3, rank=16).layer_ranks(1)
            (16, 16, 16)
        """
        if not _is_int(num_layers) or num_layers < 1:
            raise ValueError(f"num_layers must be an int >= 1, got {num_layers!r}")
        return cls((True,) * num_layers, (modules,) * num_layers, (rank,) * num_layers, lora_alpha)

    @classmethod
    def from_search(cls, config: Any, lora_alpha: float = 16.0, num_layers: int | None = None) -> MemoryConfig:
        """From a search configuration: an object or mapping with ``layer_mask``, ``modules``
        and ``ranks`` (``modules``/``ranks`` per layer, or one value for all layers).

        Example:
            >>> MemoryConfig.from_search({"layer_mask": [1, 0, 1], "modules": 2, "ranks": 32}).modules
            (2, 2, 2)
        """
        def get(name: str) -> Any:
            if isinstance(config, Mapping):
                if name not in config:
                    raise KeyError(f"search configuration has no {name!r} (expected layer_mask, modules, ranks)")
                return config[name]
            if not hasattr(config, name):
                raise TypeError(
                    f"config must have layer_mask, modules and ranks (a search configuration); "
                    f"{type(config).__name__} has no {name!r}"
                )
            return getattr(config, name)

        if num_layers is not None and not _is_int(num_layers):
            raise TypeError(f"num_layers must be an int (the model's layer count) or None, got {num_layers!r}")
        mask = get("layer_mask")
        if hasattr(mask, "tolist"):
            mask = mask.tolist()
        if isinstance(mask, (str, bytes)) or not isinstance(mask, Sequence):
            raise TypeError(f"layer_mask must be a sequence with one entry per layer, got {type(mask).__name__}")
        mask = list(mask)
        L = len(mask)
        if num_layers is not None and L != num_layers:
            raise ValueError(f"layer_mask has {L} entries but the model has {num_layers} layers")

        def per_layer(name: str, v: Any) -> list[Any]:
            if hasattr(v, "tolist"):
                v = v.tolist()
            if isinstance(v, (str, bytes)) or not isinstance(v, Sequence):
                return [v] * L  # one value for all layers (validated, naming the field, by the constructor)
            v = list(v)
            if len(v) != L:
                raise ValueError(f"{name} has {len(v)} entries but layer_mask has {L} layers")
            return v

        return cls(tuple(mask), tuple(per_layer("modules", get("modules"))),
                   tuple(per_layer("ranks", get("ranks"))), lora_alpha)

    # ------------------------------------------------------------------ access
    @property
    def num_layers(self) -> int:
        return len(self.layer_mask)

    @property
    def active_layers(self) -> tuple[int, ...]:
        """Layers that get adapters (mask on and at least one module)."""
        return tuple(li for li in range(self.num_layers) if self.layer_mask[li] and self.modules[li] > 0)

    def layer_ranks(self, layer: int) -> tuple[int, ...]:
        """Ranks of the modules at ``layer`` (``()`` when the layer is inactive).

        Example:
            >>> MemoryConfig.uniform(3, 2, 8).layer_ranks(2)
            (8, 8)
        """
        if isinstance(layer, numbers.Integral) and not isinstance(layer, bool):
            layer = int(layer)  # a numpy int (an np.nonzero index) is that layer; was "must be in [0, L), got 0"
        if not _is_int(layer) or not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be in [0, {self.num_layers}), got {layer!r}")
        if not self.layer_mask[layer] or self.modules[layer] == 0:
            return ()
        r = self.ranks[layer]
        return (r,) * self.modules[layer] if isinstance(r, int) else tuple(r)

    def check_num_layers(self, num_layers: int) -> None:
        """Raise ``ValueError`` unless the config has exactly ``num_layers`` layers.

        Example:
            >>> MemoryConfig.uniform(2).check_num_layers(2)
        """
        if not _is_int(num_layers):
            raise TypeError(f"num_layers must be an int (the model's layer count), got {num_layers!r}")
        if self.num_layers != num_layers:
            raise ValueError(
                f"MemoryConfig.layer_mask has {self.num_layers} layers but the model has {num_layers}"
            )

    def num_parameters(self, model_or_shapes: Any) -> int:
        """Exact trainable-parameter count for a model (or its per-layer FFN target shapes
        ``[[(in, out), ...], ...]``), via ``search.space.parameter_count``.

        Example:
            >>> MemoryConfig.uniform(1, 2, 8).num_parameters([[(32, 64), (64, 32)]])
            3072
        """
        from search.space import parameter_count

        if isinstance(model_or_shapes, (str, bytes)):
            raise TypeError(f"model_or_shapes must be a model or per-layer [(in, out), ...] shapes, got "
                            f"{type(model_or_shapes).__name__}")
        if isinstance(model_or_shapes, Sequence):
            try:
                shapes = [[(int(i), int(o)) for i, o in layer] for layer in model_or_shapes]
            except (TypeError, ValueError):  # not pairs of ints
                raise ValueError(f"model_or_shapes must be per-layer [(in, out), ...] shapes, got "
                                 f"{model_or_shapes!r:.80}") from None
        else:
            from .inject import ffn_target_shapes

            shapes = ffn_target_shapes(model_or_shapes)
        self.check_num_layers(len(shapes))
        ranks = [r if isinstance(r, int) else list(r) for r in self.ranks]
        return int(parameter_count(list(self.layer_mask), list(self.modules), ranks, shapes))

    # ----------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``ranks`` entries are ints or lists).

        Example:
            >>> MemoryConfig.uniform(1, 1, 8).to_dict()["ranks"]
            [8]
        """
        return {
            "format": _FORMAT,
            "layer_mask": list(self.layer_mask),
            "modules": list(self.modules),
            "ranks": [r if isinstance(r, int) else list(r) for r in self.ranks],
            "lora_alpha": self.lora_alpha,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MemoryConfig:
        """Inverse of :meth:`to_dict`.

        Example:
            >>> MemoryConfig.from_dict({"layer_mask": [True], "modules": [1], "ranks": [8]}).lora_alpha
            16.0
        """
        if not isinstance(d, Mapping):
            raise TypeError(f"d must be a mapping, got {type(d).__name__}")
        fmt = d.get("format", _FORMAT)
        if fmt != _FORMAT:
            raise ValueError(f"unknown MemoryConfig format {fmt!r}, expected {_FORMAT!r}")
        missing = [k for k in ("layer_mask", "modules", "ranks") if k not in d]
        if missing:
            raise KeyError(f"MemoryConfig dict lacks {missing}")
        unknown = set(d) - {"format", "layer_mask", "modules", "ranks", "lora_alpha"}
        if unknown:
            raise ValueError(f"MemoryConfig dict has unknown keys {sorted(unknown)}")
        def seq(v: Any) -> Any:  # JSON lists become tuples; anything else is left to the constructor to refuse
            return tuple(v) if isinstance(v, list) else v

        ranks = d["ranks"]
        if isinstance(ranks, list):
            ranks = tuple(seq(r) for r in ranks)
        return cls(seq(d["layer_mask"]), seq(d["modules"]), ranks, d.get("lora_alpha", 16.0))

    def to_json(self, path: str | os.PathLike[str] | None = None) -> str:
        """The config as JSON text; also written atomically to ``path`` when given.

        Example:
            >>> MemoryConfig.uniform(1).to_json().startswith("{")
            True
        """
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        if path is not None:
            atomic_write_text(path, text)
        return text

    @classmethod
    def from_json(cls, text_or_path: str | os.PathLike[str]) -> MemoryConfig:
        """From JSON text or a path to a JSON file.

        Example:
            >>> MemoryConfig.from_json('{"layer_mask": [1], "modules": [1], "ranks": [8]}').num_layers
            1
        """
        if isinstance(text_or_path, os.PathLike) or (
            isinstance(text_or_path, str) and not text_or_path.lstrip().startswith("{")
        ):
            p = Path(text_or_path)
            if not p.is_file():
                if isinstance(text_or_path, str):
                    try:  # JSON text of something other than an object: a malformed config, not a path
                        value = json.loads(text_or_path)
                    except ValueError:
                        pass
                    else:
                        raise ValueError(f"MemoryConfig JSON text must be an object {{...}}, got "
                                         f"{type(value).__name__} {text_or_path[:40]!r} (and no file has that name)")
                raise FileNotFoundError(f"MemoryConfig file {str(p)!r} does not exist")
            text = p.read_text(encoding="utf-8")
            where = str(p)
        elif isinstance(text_or_path, str):
            text, where = text_or_path, "text"
        else:
            raise TypeError(f"text_or_path must be JSON text or a path, got {type(text_or_path).__name__}")
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"MemoryConfig JSON ({where}) is malformed: {e}") from e
        return cls.from_dict(d)
