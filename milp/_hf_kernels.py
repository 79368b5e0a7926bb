"""Imported first by :mod:`milp`: stop with the fix before transformers fails to import its
model classes, where Hugging Face's ``kernels`` is installed and transformers would import its
hub-kernel API from milp-toolkit's ``kernels`` (the shared import name: ``kernels/_name_clash.py``)."""
from __future__ import annotations

from kernels import _name_clash


def refuse_clash() -> None:
    """Raise ``ImportError`` with the fix when Hugging Face's ``kernels`` is installed and
    transformers' hub-kernel integration fails to import because of it (transformers 5.x imports
    ``from kernels import CUDAProperties, ...`` once its probe accepts the distribution's version;
    4.x catches the failure itself, and then nothing is refused).

    Example:
        >>> refuse_clash()   # nothing to say in milp-toolkit's own environments
    """
    version = _name_clash.hf_kernels_version()
    if version is None:
        return
    try:
        import transformers.integrations.hub_kernels  # noqa: F401  (what every model class imports)
    except ImportError as exc:
        if "kernels" not in str(exc):
            raise
        raise ImportError(_name_clash.clash_message(version, transformers_uses_it=True)) from exc


refuse_clash()
