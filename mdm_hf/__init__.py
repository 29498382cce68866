"""mdm-hf: Multimodal Distribution Matching for vision-language dataset distillation on the Hugging Face Hub.

Importing the package is cheap and needs no network: the heavy modules load on first use.
"""

from typing import TYPE_CHECKING

__version__ = "0.1.0"

_LAZY = {
    "MDMConfig": "mdm_hf.config",
    "MDMDistiller": "mdm_hf.distill",
    "SyntheticSet": "mdm_hf.synthetic",
    "DualEncoder": "mdm_hf.models",
}

__all__ = ["__version__", "DualEncoder", "MDMConfig", "MDMDistiller", "SyntheticSet"]

if TYPE_CHECKING:
    from .config import MDMConfig
    from .distill import MDMDistiller
    from .models import DualEncoder
    from .synthetic import SyntheticSet


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mdm_hf' has no attribute {name!r}")
