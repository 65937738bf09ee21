"""Building blocks: parameters with logical names, RMSNorm, linear, SwiGLU MLP, embedding, RoPE."""

from deepseek_jax.layers.basic import (
    MLP,
    Embed,
    Linear,
    RMSNorm,
    matmul,
    param,
    rms_norm,
    swiglu,
)

__all__ = ["MLP", "Embed", "Linear", "RMSNorm", "matmul", "param", "rms_norm", "swiglu"]
