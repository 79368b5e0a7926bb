"""The import name ``kernels`` is also Hugging Face's ``kernels`` package.

Only one package of a name can be imported in a Python process. Up to transformers 5.24 Hugging
Face's ``kernels`` was an optional extra: transformers probes for it
(``transformers.utils.import_utils.is_kernels_available``: a distribution named ``kernels`` in its
supported version range) and, when the probe says yes, imports its layer API
(``from kernels import CUDAProperties, ...``) from whatever ``import kernels`` gives, which is this
package. transformers 5.25 made it a hard dependency, so installing it installs Hugging Face's
``kernels`` and ``import transformers``' model classes fail with
``ImportError: cannot import name 'CUDAProperties' from 'kernels'``. milp-toolkit therefore pins
``transformers<5.25`` (setup.py); this module names the problem when an environment has it anyway.

Example:
    >>> hf_kernels_version() is None or isinstance(hf_kernels_version(), str)
    True
"""
from __future__ import annotations

import importlib.metadata

__all__ = ["HF_KERNELS_ADVICE", "hf_kernels_version", "clash_message"]

#: how to get a working environment back
HF_KERNELS_ADVICE = (
    "milp-toolkit's `kernels` package and Hugging Face's `kernels` distribution share the import name "
    "`kernels`, and only one of them can be imported. Use transformers<5.25 (5.25 requires Hugging Face's "
    "`kernels`; milp-toolkit's setup.py pins it) and remove the other package: "
    "`pip install 'transformers<5.25' && pip uninstall -y kernels`, then reinstall milp-toolkit "
    "(`pip install -e .`) if its files were overwritten."
)


def hf_kernels_version() -> str | None:
    """The version of an installed distribution named ``kernels`` (Hugging Face's: milp-toolkit's
    own distribution is ``milp-toolkit``), or ``None`` when there is none.

    Example:
        >>> v = hf_kernels_version()   # None in milp-toolkit's own environments
    """
    try:
        return importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        return None


def clash_message(version: str, transformers_uses_it: bool) -> str:
    """The message for an environment that holds Hugging Face's ``kernels`` ``version``.

    Example:
        >>> "transformers<5.25" in clash_message("0.19.1", True)
        True
    """
    what = (
        "transformers will import its hub-kernel API from milp-toolkit's `kernels` and fail"
        if transformers_uses_it
        else "code that imports Hugging Face's `kernels` gets milp-toolkit's instead"
    )
    return f"Hugging Face's `kernels` {version} is installed in this environment: {what}. {HF_KERNELS_ADVICE}"
