"""Hugging Face DeepseekV3/V2 checkpoints in and out: ``from_pretrained``, ``save_pretrained``.

Loading streams: the model is built abstractly (shapes and shardings, no memory), then each
leaf is assembled on its devices from the HF tensors it needs, read one at a time
(``jax.make_array_from_callback`` asks for exactly the block each device holds; stacked
per-layer leaves are filled one layer at a time into a donated buffer). Host memory stays
near one tensor (for routed experts: one layer's experts of one device). Every tensor's
presence and shape is checked from the file headers before anything is read.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import deepseek_jax.interop.hf_names as hn
from deepseek_jax.config import ModelConfig
from deepseek_jax.interop.fp8_weights import check_scale_shape, dequantize_blocks
from deepseek_jax.interop.hf_config import config_from_hf, fp8_block, hf_config_dict, read_hf_config
from deepseek_jax.interop.safetensors_io import (
    SafetensorsReader,
    TensorSpec,
    save_sharded,
)


class CheckpointMismatchError(ValueError):
    """The checkpoint does not hold what the config says (missing tensor, wrong shape)."""


# ------------------------------------------------------------------------------ loading


def from_pretrained(
    path: str | os.PathLike,
    *,
    mesh: jax.sharding.Mesh | None = None,
    dtype: str = "float32",
    param_dtype: str = "float32",
    mtp: bool = True,
):
    """A ``Transformer`` with the weights of a HF DeepseekV3/V2 safetensors directory.

    Args:
      path: directory with ``config.json`` and ``*.safetensors`` (sharded with
        ``model.safetensors.index.json``, or not); official FP8 weights are dequantised.
      mesh: parameters are born sharded on it by the rules table (default: plain arrays
        on the default device).
      dtype: compute dtype (``ModelConfig.dtype``).
      param_dtype: parameter storage; float32 master weights by default, ``bfloat16``
        halves the memory for inference. Routing biases stay float32.
      mtp: load the MTP layers the checkpoint has (none present: the model has none).
    Returns:
      The model, its ``cfg`` taken from ``config.json``.
    """
    from deepseek_jax.build import abstract_model
    from deepseek_jax.sharding import state_shardings

    path = os.fspath(path)
    raw = read_hf_config(path)
    reader = SafetensorsReader(path)
    cfg = config_from_hf(raw, dtype=dtype)
    cfg = dataclasses.replace(cfg, num_nextn_predict_layers=_mtp_depth(cfg, reader, mtp))
    graphdef, abs_state = nnx.split(abstract_model(cfg))
    if mesh is None:  # plain arrays on the default device
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(
            lambda _: one, abs_state, is_leaf=lambda x: isinstance(x, nnx.Variable)
        )
    else:
        shardings = state_shardings(abs_state, mesh)
    loader = _Loader(
        reader, cfg, fp8_block(raw), raw.get("rope_interleave", True), jnp.dtype(param_dtype)
    )
    leaves = _leaves(abs_state)
    for p, v in leaves:
        loader.check(p, v.shape)
    state = jax.tree_util.tree_map_with_path(
        lambda kp, v, s: v.replace(loader.load(_path(kp), v, s)),
        abs_state,
        shardings,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
    loader.warn_unused()
    return nnx.merge(graphdef, state)


def _mtp_depth(cfg: ModelConfig, reader: SafetensorsReader, wanted: bool) -> int:
    """MTP layers to build: those configured that the checkpoint holds (HF writes none)."""
    if not wanted:
        return 0
    L = cfg.num_hidden_layers
    have = 0
    while (
        have < cfg.num_nextn_predict_layers and f"model.layers.{L + have}.eh_proj.weight" in reader
    ):
        have += 1
    if 0 < have < cfg.num_nextn_predict_layers:
        warnings.warn(
            f"{reader.directory}: config has {cfg.num_nextn_predict_layers} MTP layers, "
            f"the checkpoint {have}; loading {have}",
            stacklevel=3,
        )
    return have


def _path(keypath) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in keypath)


def _leaves(state) -> list[tuple[tuple[str, ...], nnx.Variable]]:
    flat = jax.tree_util.tree_flatten_with_path(
        state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )[0]
    return [(_path(kp), v) for kp, v in flat]


def _is_bias(v) -> bool:
    return type(v).__name__ == "RoutingBias"


class _Loader:
    """Reads, checks, dequantises and lays out HF tensors for our leaves."""

    def __init__(
        self,
        reader: SafetensorsReader,
        cfg: ModelConfig,
        block,
        interleaved: bool,
        param_dtype: jnp.dtype,
    ):
        self.reader, self.cfg, self.block = reader, cfg, block
        self.interleaved, self.param_dtype = interleaved, param_dtype
        self.used: set[str] = set()
        self._cache: tuple[Any, np.ndarray] | None = None

    # -- checks, from the headers only
    def _expect(self, name: str, shape: tuple[int, ...], owner: str) -> None:
        if name not in self.reader:
            raise CheckpointMismatchError(
                f"{self.reader.directory}: missing tensor {name} (for our {owner})"
            )
        found = self.reader.info(name).shape
        if tuple(found) != tuple(shape):
            raise CheckpointMismatchError(
                f"tensor {name}: expected shape {list(shape)}, found {list(found)} "
                f"(for our {owner})"
            )
        scale = name + "_scale_inv"
        if scale in self.reader:
            check_scale_shape(name, found, self.reader.info(scale).shape, self.block or (128, 128))

    def _fused(self, m: hn.LeafMap, i: int) -> bool:
        return m.kind == "expert" and m.names(i, 0, fused=True)[0] in self.reader

    def check(self, path: tuple[str, ...], shape: tuple[int, ...]) -> None:
        m = hn.leaf_map(path, self.cfg)
        one = tuple(shape[1:]) if m.stacked else tuple(shape)
        for i in range(len(m.prefixes)):
            if self._fused(m, i):
                self._expect(m.names(i, 0, fused=True)[0], hn.fused_expert_shape(m, one), m.key)
            else:
                want = hn.hf_shape(m, one)
                for name in m.names(i, one[0] if m.kind == "expert" else 0):
                    self._expect(name, want, m.key)

    # -- reading
    def _read(self, name: str) -> np.ndarray:
        self.used.add(name)
        x = self.reader.read(name)
        scale = name + "_scale_inv"
        if scale in self.reader:
            self.used.add(scale)
            return dequantize_blocks(x, self.reader.read(scale), self.block or (128, 128))
        return x.astype(np.float32) if x.dtype != np.float32 else x

    def _whole(self, m: hn.LeafMap, i: int, shape: tuple[int, ...]) -> np.ndarray:
        """Slice ``i`` of a non-expert leaf in our layout (cached: every device asks)."""
        if self._cache is not None and self._cache[0] == (m.key, i):
            return self._cache[1]
        x = hn.to_ours(m, self._read(m.names(i, 0)[0]), shape)
        if m.rope_channels and not self.interleaved:
            x = hn.to_interleaved(x, self.cfg.qk_rope_head_dim)
        self._cache = ((m.key, i), x)
        return x

    def _experts(self, m: hn.LeafMap, i: int, shape: tuple[int, ...], lo: int, hi: int):
        """Experts ``lo:hi`` of slice ``i``, our layout [hi - lo, in, out]."""
        if self._fused(m, i):
            key = (m.names(i, 0, fused=True)[0], i)
            if self._cache is None or self._cache[0] != key:
                self._cache = (key, self._read(key[0]))
            return hn.experts_from_fused(m, self._cache[1], lo, hi)
        names = m.names(i, shape[0])
        return np.stack([hn.to_ours(m, self._read(names[j]), shape[1:]) for j in range(lo, hi)])

    def _block(self, m, i, shape, dt, index) -> np.ndarray:
        if m.kind == "expert":
            lo, hi, _ = index[0].indices(shape[0])
            x = self._experts(m, i, shape, lo, hi)[(slice(None), *index[1:])]
        else:
            x = self._whole(m, i, shape)[index]
        return np.asarray(x, dt)

    def load(self, path: tuple[str, ...], v: nnx.Variable, sharding: NamedSharding) -> jax.Array:
        m = hn.leaf_map(path, self.cfg)
        dt = jnp.float32 if _is_bias(v) else self.param_dtype
        shape = tuple(v.shape)
        if not m.stacked:
            out = jax.make_array_from_callback(
                shape, sharding, partial(self._block, m, 0, shape, dt)
            )
        else:
            inner = _drop_leading_axis(sharding, len(shape))
            out = _zeros(shape, dt, sharding)
            for i in range(shape[0]):
                piece = jax.make_array_from_callback(
                    shape[1:], inner, partial(self._block, m, i, shape[1:], dt)
                )
                out = _set_slice(out, piece, i)
        self._cache = None
        return out

    def warn_unused(self) -> None:
        L = self.cfg.num_hidden_layers
        extra = {
            n
            for k in range(self.cfg.num_nextn_predict_layers)
            for n in hn.mtp_extra_names(self.cfg, k)
        }
        beyond = re.compile(r"model\.layers\.(\d+)\.")
        unused = []
        for name in self.reader.names():
            if name in self.used or name in extra or name.endswith("rotary_emb.inv_freq"):
                continue
            hit = beyond.match(name)
            if hit and int(hit.group(1)) >= L + self.cfg.num_nextn_predict_layers:
                continue  # MTP layers we were asked not to load
            unused.append(name)
        if unused:
            warnings.warn(
                f"{self.reader.directory}: {len(unused)} tensor(s) not used: "
                f"{', '.join(unused[:5])}",
                stacklevel=3,
            )


def _drop_leading_axis(sharding, ndim: int):
    """The sharding of one slice along the leading (layers) axis."""
    if not isinstance(sharding, NamedSharding):
        return sharding
    spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
    return NamedSharding(sharding.mesh, P(*spec[1:]))


def _zeros(shape, dtype, sharding) -> jax.Array:
    return jax.jit(partial(jnp.zeros, shape, dtype), out_shardings=sharding)()


@partial(jax.jit, donate_argnums=0)
def _set_slice(full: jax.Array, piece: jax.Array, i) -> jax.Array:
    return jax.lax.dynamic_update_index_in_dim(full, piece.astype(full.dtype), i, 0)


# ------------------------------------------------------------------------------ saving


def save_pretrained(
    model, path: str | os.PathLike, *, dtype: str = "float32", max_shard_size: int = 5 * 10**9
) -> list[str]:
    """Writes ``model`` as a HF DeepseekV3 (or V2) safetensors directory.

    Args:
      model: a ``Transformer``.
      path: output directory (created; earlier safetensors files in it are replaced).
      dtype: storage dtype of the weights, ``float32`` (exact) or ``bfloat16``; routing
        biases are always float32.
      max_shard_size: bytes per safetensors file; more files get an index.
    Returns:
      The safetensors file names written. Tensors are fetched from the devices one at a
      time (routed experts one expert at a time).
    """
    cfg: ModelConfig = model.cfg
    path = os.fspath(path)
    store = jnp.dtype(dtype)
    state = nnx.state(model)
    entries: dict[str, tuple] = {}  # HF name -> (producer, dtype, shape)
    for p, v in _leaves(state):
        m = hn.leaf_map(p, cfg)
        arr = v[...]
        dt = np.dtype(np.float32) if _is_bias(v) else np.dtype(store)
        one = tuple(arr.shape[1:]) if m.stacked else tuple(arr.shape)
        for i in range(len(m.prefixes)):
            if m.kind == "expert":
                for j, name in enumerate(m.names(i, one[0])):
                    entries[name] = (partial(_fetch, arr, m, i, j), dt, hn.hf_shape(m, one))
            else:
                entries[m.names(i, 0)[0]] = (
                    partial(_fetch, arr, m, i, None),
                    dt,
                    hn.hf_shape(m, one),
                )
    for k in range(cfg.num_nextn_predict_layers):
        for name, src in hn.mtp_extra_names(cfg, k).items():
            entries[name] = entries[
                "model.embed_tokens.weight" if src[0] == "embed_tokens" else "lm_head.weight"
            ]
    specs = [TensorSpec(n, entries[n][1], entries[n][2]) for n in sorted(entries, key=_order)]
    files = save_sharded(
        path,
        specs,
        lambda n: np.asarray(entries[n][0](), entries[n][1]),
        max_shard_bytes=max_shard_size,
    )
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config_dict(cfg, dtype), f, indent=2)
    return files


def _fetch(arr: jax.Array, m: hn.LeafMap, i: int, j: int | None) -> np.ndarray:
    lead = ((i,) if m.stacked else ()) + (() if j is None else (j,))
    return hn.to_hf(m, host_slice(arr, lead))


def host_slice(arr: jax.Array, lead: tuple[int, ...]) -> np.ndarray:
    """``arr[lead]`` as float32 on the host, read from the device shards that hold it.

    Only those blocks travel (one copy of each, whatever the replication); no collective
    runs, so it works for any sharding, Explicit mesh axes included.
    """
    n = len(lead)
    out = np.empty(arr.shape[n:], np.float32)
    done = set()
    for shard in arr.addressable_shards:
        idx = shard.index
        lo = [sl.start or 0 for sl in idx[:n]]
        if not all(
            a <= k < (sl.stop if sl.stop is not None else dim)
            for a, k, sl, dim in zip(lo, lead, idx[:n], arr.shape[:n], strict=True)
        ):
            continue
        rest = tuple(idx[n:])
        key = tuple((sl.start, sl.stop) for sl in rest)
        if key in done:
            continue
        done.add(key)
        local = tuple(k - a for k, a in zip(lead, lo, strict=True))
        out[rest] = np.asarray(shard.data[local], np.float32)
    return out


def _order(name: str) -> tuple:
    """Non-layer tensors first, then by layer number, then by name (shards split by layer)."""
    hit = re.match(r"model\.layers\.(\d+)\.", name)
    return (int(hit.group(1)) if hit else -1, name)
