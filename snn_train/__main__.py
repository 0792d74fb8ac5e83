"""``python -m snn_train`` runs the training application, as ``snn-train`` does."""

from snn_train.cli import train

train()
