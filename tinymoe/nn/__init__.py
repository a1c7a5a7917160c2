"""Layers of the OpenMoE decoder, on tinymoe's autograd."""
from tinymoe.nn.module import Module, ModuleList, Parameter
from tinymoe.nn.layers import Attention, Embedding, FeedForward, KVCache, Linear, RMSNorm, RotaryEmbedding

__all__ = ["Module", "ModuleList", "Parameter",
           "Linear", "Embedding", "RMSNorm", "RotaryEmbedding", "KVCache", "Attention", "FeedForward"]
from tinymoe.nn.moe import Experts, MoE, MoEStats, Router  # noqa: E402
from tinymoe.nn.model import Block, ModelCache, ModelOutput, OpenMoE  # noqa: E402
__all__ += ["Router", "Experts", "MoE", "MoEStats", "Block", "OpenMoE", "ModelOutput", "ModelCache"]
