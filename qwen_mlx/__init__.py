"""qwen-mlx: Qwen3 on Apple Silicon, built on MLX.

import mlx.core as mx, qwen_mlx
model = qwen_mlx.load("Qwen/Qwen3-4B", quantize=4)
logits = model(mx.array([[151644, 872, 198]]))
"""

from .checkpoint import Loaded
from .config import ModelArgs
from .errors import QwenMLXError
from .loader import load, load_model
from .model import Model
from .save import save

__version__ = "0.1.0"
__all__ = ["Loaded", "Model", "ModelArgs", "QwenMLXError", "load", "load_model", "save", "__version__"]
