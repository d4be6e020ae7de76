"""The converter: Hugging Face Qwen3 checkpoints to MLX folders, quantized and checked.

python -m qwen_mlx.convert Qwen/Qwen3-4B -o Qwen3-4B-4bit --q-bits 4
"""

from .core import Conversion, convert

__all__ = ["Conversion", "convert"]
