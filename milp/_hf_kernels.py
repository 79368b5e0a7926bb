"""Imported first by :mod:`milp`: stop with the fix before transformers fails to import its
model classes, where Hugging Face's ``kernels`` is installed and transformers' probe takes it for
usable (the shared import name ``kernels``: see ``kernels/_name_clash.py``)."""
from __future__ import annotations

from kernels import _name_clash


def refuse_clash() -> None:
    """Raise ``ImportError`` with the fix when transformers would import Hugging Face's hub-kernel
    API from milp-toolkit's ``kernels``.

    Example:
        >>> refuse_clash()   # nothing to say in milp-toolkit's own environments
    """
    version = _name_clash.hf_kernels_version()
    if version is None:
        return
    from transformers.utils import import_utils

    if import_utils.is_kernels_available():
        raise ImportError(_name_clash.clash_message(version, transformers_uses_it=True))


refuse_clash()
