"""Torch-free runtime: nothing under this package may import torch or transformers."""
