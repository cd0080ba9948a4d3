"""DySpec: lossless speculative decoding with dynamic token trees.

The pure core (token tree, builders, tree attention inputs, verifiers) depends on torch only;
`generate` runs it in one process on transformers models.
"""
from dyspec.generate import METHODS, GenerationResult, generate

__all__ = ["METHODS", "GenerationResult", "generate"]
