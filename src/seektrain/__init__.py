"""seektrain: train DeepSeek-V3-style language models from raw text to a transformers checkpoint.

`ModelConfig` imports without torch; `Transformer` (and anything else that needs torch) loads on
first use.
"""

from seektrain.model.config import ModelConfig

__all__ = ["ModelConfig", "Transformer"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "Transformer":
        from seektrain.model.transformer import Transformer

        return Transformer
    raise AttributeError(f"module 'seektrain' has no attribute {name!r}")
