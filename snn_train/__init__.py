"""snn-train: convolutional spiking (LIF) networks trained with surrogate gradients.

The package's names are imported on first use, so that the commands start without torch where they need none
(``--help``, TAB completion: Hydra, the configs and ``schema`` suffice).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from snn_train.config import load_config
    from snn_train.model import ConvSNN
    from snn_train.neurons import LIFParameters, LIParameters

_HOMES = {
    "ConvSNN": "snn_train.model",
    "LIFParameters": "snn_train.neurons",
    "LIParameters": "snn_train.neurons",
    "load_config": "snn_train.config",
}
__all__ = ["ConvSNN", "LIFParameters", "LIParameters", "load_config"]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'snn_train' has no attribute {name!r}")
    return getattr(import_module(_HOMES[name]), name)
