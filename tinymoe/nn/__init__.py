"""Layers of the OpenMoE decoder, on tinymoe's autograd."""
from tinymoe.nn.module import Module, ModuleList, Parameter

__all__ = ["Module", "ModuleList", "Parameter"]
