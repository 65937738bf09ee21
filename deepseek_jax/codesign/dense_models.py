"""Dense (MHA / GQA) transformers the papers compare against (ISCA 2025, Tables 1 and 2).

Shapes from the released Hugging Face ``config.json`` files. ``num_key_value_heads`` equal
to ``num_attention_heads`` is MHA; fewer is GQA.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class DenseModel:
    name: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int  # SwiGLU, three matrices
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int

    @property
    def is_mha(self) -> bool:
        return self.num_key_value_heads == self.num_attention_heads

    def matmul_params(self, with_embedding: bool = False) -> int:
        """Weight-matrix parameters: attention, SwiGLU MLP, output head (untied).

        Ignored: norm vectors and Qwen's q/k/v biases (a few hundred thousand). The input
        embedding is a lookup, so it is excluded unless ``with_embedding``.
        """
        d, h, kv, n = (
            self.hidden_size,
            self.num_attention_heads,
            self.num_key_value_heads,
            self.head_dim,
        )
        attn = d * h * n * 2 + d * kv * n * 2  # q, o; k, v
        mlp = 3 * d * self.intermediate_size
        head = d * self.vocab_size
        return self.num_hidden_layers * (attn + mlp) + head * (2 if with_embedding else 1)


QWEN25_72B = DenseModel(
    "Qwen-2.5 72B",
    hidden_size=8192,
    num_hidden_layers=80,
    intermediate_size=29568,
    num_attention_heads=64,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=152064,
)
LLAMA31_405B = DenseModel(
    "LLaMA-3.1 405B",
    hidden_size=16384,
    num_hidden_layers=126,
    intermediate_size=53248,
    num_attention_heads=128,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=128256,
)

DENSE_MODELS: dict[str, DenseModel] = {m.name: m for m in (QWEN25_72B, LLAMA31_405B)}
