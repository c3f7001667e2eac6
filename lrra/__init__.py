"""LRRA: data-free knowledge distillation by Learning to Retain while Acquiring (CVPR 2023)."""

__version__ = "0.1.0"
