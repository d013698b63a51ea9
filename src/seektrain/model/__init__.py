"""The DeepSeek-V3 model: `ModelConfig` (torch-free, presets) and `Transformer` (loaded on first use)."""

from seektrain.model.config import ModelConfig

__all__ = ["ModelConfig", "Transformer"]


def __getattr__(name: str):
    if name == "Transformer":
        from seektrain.model.transformer import Transformer

        return Transformer
    raise AttributeError(f"module 'seektrain.model' has no attribute {name!r}")
