"""Models funcpatch can patch: the toy MicroModel and transformers models via TransformerLens."""

from funcpatch.models.hf import from_hf
from funcpatch.models.micro import MicroBlock, MicroModel

__all__ = ["MicroModel", "MicroBlock", "from_hf"]
