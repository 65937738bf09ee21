"""Our state paths <-> Hugging Face DeepseekV3/V2 tensor names and layouts.

Every leaf of our state maps to HF tensors by one rule (``LeafMap``):

* ``copy``: same array (embeddings, norms, the routing bias).
* ``linear``: torch stores ``W[out, in]``, we store ``[in..., out...]``: ours is
  ``W.T.reshape(ours)``, e.g. ``q_b_proj [H*(N+R), Q] -> [Q, H, N+R]``,
  ``o_proj [D, H*O] -> [H, O, D]`` (two leading ``in`` axes, ``n_in=2``).
* ``expert``: our ``w_gate/w_up [E, D, F]``, ``w_down [E, F, D]`` from the per-expert
  ``mlp.experts.{j}.{gate,up,down}_proj.weight`` of the released checkpoints, or from the
  fused ``mlp.experts.gate_up_proj [E, 2F, D]`` / ``mlp.experts.down_proj [E, D, F]`` that
  transformers >= 5 writes with ``save_original_format=False``.

Decoder layer ``i`` is ``model.layers.{i}``: dense ones are our ``dense_layers[i]``, MoE ones
``moe_layers[i - first_k_dense_replace]`` (stacked on a leading axis). MTP module ``k`` is
layer ``num_hidden_layers + k``: ``enorm``, ``hnorm``, ``eh_proj``, its block's tensors and
``shared_head.norm`` (our ``mtp[k].norm``); its ``embed_tokens`` and ``shared_head.head`` are
copies of the main model's (we share them: ignored on import, written on export).

RoPE: our q/k rope channels are in the interleaved order of the released checkpoints
(``layers/rope.py``). A V3 config with ``rope_interleave: false`` holds them half-split;
``to_interleaved`` reorders them on import.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from deepseek_jax.config import ModelConfig

Kind = Literal["copy", "linear", "expert"]

# Within one decoder layer: our path (after the block) -> (HF suffix, kind, n_in).
_BLOCK: dict[tuple[str, ...], tuple[str, Kind, int]] = {
    ("input_layernorm", "weight"): ("input_layernorm.weight", "copy", 0),
    ("post_attention_layernorm", "weight"): ("post_attention_layernorm.weight", "copy", 0),
    ("self_attn", "q_proj"): ("self_attn.q_proj.weight", "linear", 1),
    ("self_attn", "q_a_proj"): ("self_attn.q_a_proj.weight", "linear", 1),
    ("self_attn", "q_a_layernorm"): ("self_attn.q_a_layernorm.weight", "copy", 0),
    ("self_attn", "q_b_proj"): ("self_attn.q_b_proj.weight", "linear", 1),
    ("self_attn", "kv_a_proj_with_mqa"): ("self_attn.kv_a_proj_with_mqa.weight", "linear", 1),
    ("self_attn", "kv_a_layernorm"): ("self_attn.kv_a_layernorm.weight", "copy", 0),
    ("self_attn", "kv_b_proj"): ("self_attn.kv_b_proj.weight", "linear", 1),
    ("self_attn", "o_proj"): ("self_attn.o_proj.weight", "linear", 2),
    ("mlp", "gate_proj"): ("mlp.gate_proj.weight", "linear", 1),
    ("mlp", "up_proj"): ("mlp.up_proj.weight", "linear", 1),
    ("mlp", "down_proj"): ("mlp.down_proj.weight", "linear", 1),
    ("mlp", "gate"): ("mlp.gate.weight", "linear", 1),
    ("mlp", "e_score_correction_bias"): ("mlp.gate.e_score_correction_bias", "copy", 0),
    ("mlp", "shared_experts", "gate_proj"): ("mlp.shared_experts.gate_proj.weight", "linear", 1),
    ("mlp", "shared_experts", "up_proj"): ("mlp.shared_experts.up_proj.weight", "linear", 1),
    ("mlp", "shared_experts", "down_proj"): ("mlp.shared_experts.down_proj.weight", "linear", 1),
    ("mlp", "w_gate"): ("gate_proj", "expert", 1),
    ("mlp", "w_up"): ("up_proj", "expert", 1),
    ("mlp", "w_down"): ("down_proj", "expert", 1),
}
_TOP: dict[tuple[str, ...], tuple[str, Kind, int]] = {
    ("embed_tokens", "embedding"): ("model.embed_tokens.weight", "copy", 0),
    ("norm", "weight"): ("model.norm.weight", "copy", 0),
    ("lm_head",): ("lm_head.weight", "linear", 1),
}
_MTP: dict[tuple[str, ...], tuple[str, Kind, int]] = {
    ("enorm", "weight"): ("enorm.weight", "copy", 0),
    ("hnorm", "weight"): ("hnorm.weight", "copy", 0),
    ("eh_proj",): ("eh_proj.weight", "linear", 1),
    ("norm", "weight"): ("shared_head.norm.weight", "copy", 0),
}
ROPE_LEAVES = {
    ("self_attn", "q_proj"),
    ("self_attn", "q_b_proj"),
    ("self_attn", "kv_a_proj_with_mqa"),
}


@dataclass(frozen=True)
class LeafMap:
    """How one leaf of our state is stored in a HF checkpoint."""

    path: tuple[str, ...]  # our state path, e.g. ("moe_layers", "mlp", "w_gate")
    prefixes: tuple[str, ...]  # HF prefix of each stacked slice; one entry when unstacked
    stacked: bool  # leading axis = layers
    suffix: str  # HF name after the prefix (expert leaves: the projection name)
    kind: Kind
    n_in: int  # leading axes of ours that form torch's `in` dimension (linear / expert)
    block_path: tuple[str, ...] = ()  # the path inside a decoder block, if any

    @property
    def key(self) -> str:
        return "/".join(self.path)

    def names(self, i: int, num_experts: int, fused: bool = False) -> list[str]:
        """HF tensor names that make slice ``i`` (one name unless per-expert)."""
        p = self.prefixes[i]
        if self.kind != "expert":
            return [p + self.suffix]
        if fused:
            return [
                p
                + (
                    "mlp.experts.down_proj"
                    if self.suffix == "down_proj"
                    else "mlp.experts.gate_up_proj"
                )
            ]
        return [f"{p}mlp.experts.{j}.{self.suffix}.weight" for j in range(num_experts)]

    @property
    def rope_channels(self) -> bool:
        return self.block_path in ROPE_LEAVES


def leaf_map(path: tuple[str, ...], cfg: ModelConfig) -> LeafMap:
    """The rule for our state leaf at ``path`` (raises on a path we do not know)."""
    L, k_dense = cfg.num_hidden_layers, cfg.first_k_dense_replace
    head = path[0]
    if head in ("dense_layers", "moe_layers"):
        first, n = (0, k_dense) if head == "dense_layers" else (k_dense, cfg.num_moe_layers)
        rule = _BLOCK.get(path[1:])
        prefixes = tuple(f"model.layers.{first + i}." for i in range(n))
        stacked, block_path = True, path[1:]
    elif head == "mtp":
        prefixes = (f"model.layers.{L + int(path[1])}.",)
        stacked = False
        if path[2] == "block":
            rule, block_path = _BLOCK.get(path[3:]), path[3:]
        else:
            rule, block_path = _MTP.get(path[2:]), ()
    else:
        rule, prefixes, stacked, block_path = _TOP.get(path), ("",), False, ()
    if rule is None:
        raise KeyError(f"no Hugging Face name for our parameter {'/'.join(path)}")
    suffix, kind, n_in = rule
    return LeafMap(path, prefixes, stacked, suffix, kind, n_in, block_path)


def mtp_extra_names(cfg: ModelConfig, depth: int) -> dict[str, tuple[str, ...]]:
    """The MTP layer's copies of the shared embedding and head: HF name -> our path."""
    p = f"model.layers.{cfg.num_hidden_layers + depth}."
    return {
        p + "embed_tokens.weight": ("embed_tokens", "embedding"),
        p + "shared_head.head.weight": ("lm_head",),
    }


# ------------------------------------------------------------------------------ layouts


def hf_shape(m: LeafMap, ours: tuple[int, ...]) -> tuple[int, ...]:
    """The torch shape of one HF tensor for an (unstacked) slice of shape ``ours``."""
    if m.kind == "copy":
        return tuple(ours)
    if m.kind == "linear":
        return (math.prod(ours[m.n_in :]), math.prod(ours[: m.n_in]))
    return (ours[2], ours[1])  # one expert: [E, in, out] -> [out, in]


def to_ours(m: LeafMap, x: np.ndarray, ours: tuple[int, ...]) -> np.ndarray:
    """HF tensor (torch layout) -> our layout of shape ``ours``."""
    if m.kind == "copy":
        return x.reshape(ours)
    return np.ascontiguousarray(x.T).reshape(ours)


def to_hf(m: LeafMap, y: np.ndarray) -> np.ndarray:
    """Our slice -> the HF tensor (torch layout)."""
    if m.kind == "copy":
        return y
    return np.ascontiguousarray(y.reshape(math.prod(y.shape[: m.n_in]), -1).T)


def experts_from_fused(m: LeafMap, x: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Experts ``lo:hi`` in our layout from a fused ``gate_up_proj``/``down_proj`` tensor."""
    x = x[lo:hi]
    if m.suffix != "down_proj":
        F = x.shape[1] // 2
        x = x[:, :F] if m.suffix == "gate_proj" else x[:, F:]
    return np.ascontiguousarray(np.swapaxes(x, 1, 2))


def fused_expert_shape(m: LeafMap, ours: tuple[int, ...]) -> tuple[int, ...]:
    """Torch shape of the fused tensor holding this expert leaf (ours = [E, in, out])."""
    E, d_in, d_out = ours
    return (E, d_out, d_in) if m.suffix == "down_proj" else (E, 2 * d_out, d_in)


def to_interleaved(y: np.ndarray, rope_dim: int) -> np.ndarray:
    """Half-split rope channels (the last ``rope_dim`` of the last axis) -> interleaved pairs."""
    keep, rope = y[..., :-rope_dim], y[..., -rope_dim:]
    half = rope_dim // 2
    pairs = np.stack([rope[..., :half], rope[..., half:]], axis=-1).reshape(rope.shape)
    return np.concatenate([keep, pairs], axis=-1)
