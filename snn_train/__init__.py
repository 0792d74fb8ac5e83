"""snn-train: convolutional spiking (LIF) networks trained with surrogate gradients."""

from snn_train.config import load_config
from snn_train.model import ConvSNN
from snn_train.neurons import LIFParameters, LIParameters

__all__ = ["ConvSNN", "LIFParameters", "LIParameters", "load_config"]
