"""Where a serving program runs: a mesh (or none), the model placed on it, its page pool.

DeepSeek serves prefill and decode as separate deployments, prefill with a larger
expert-parallel group than decode (V3TR 3.4). Here a ``Stage`` is one of them: the same
weights laid out on its mesh by the rules table (routed experts split over the mesh's
expert axes), and its own page pool. Both pools use the same page ids (one allocator), so
handing a prefilled request to decode copies its pages ``ids`` from one pool to the
other: gathered on the prefill mesh, moved, scattered on the decode mesh.

Shape letters: K the page ids handed over (not experts per token), N pages, P positions per
page, C kv_lora_rank, R rope dim.
"""

from __future__ import annotations

import contextlib
import dataclasses
from functools import partial

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from deepseek_jax.infer.paged import PagedDecoder, PagedLayer
from deepseek_jax.model import Transformer
from deepseek_jax.sharding import logical_to_spec, state_shardings


@dataclasses.dataclass
class Stage:
    mesh: jax.sharding.Mesh | None
    graphdef: nnx.GraphDef
    state: nnx.State
    caches: list[PagedLayer]

    @classmethod
    def build(
        cls, model: Transformer, mesh, num_pages: int, page_size: int, attention: str = "auto"
    ) -> Stage:
        """The model's weights on ``mesh`` (by their logical names), and an empty pool."""
        if mesh is not None:
            graphdef, state = nnx.split(model)
            model = nnx.merge(graphdef, jax.device_put(state, state_shardings(state, mesh)))
        with cls._on(mesh):
            dec = PagedDecoder(model, attention)
            graphdef, state = nnx.split(dec)
            caches = jax.jit(partial(dec.init_cache, num_pages, page_size))()
        return cls(mesh, graphdef, state, caches)

    @staticmethod
    def _on(mesh):
        return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)

    @property
    def batch_shards(self) -> int:
        """How many ways the mesh splits the batch axis: program rows come in multiples."""
        if self.mesh is None:
            return 1
        axes = logical_to_spec(("batch",), mesh_axes=self.mesh.axis_names)[0] or ()
        axes = (axes,) if isinstance(axes, str) else axes
        return int(np.prod([self.mesh.shape[a] for a in axes]))

    def on(self):
        """The context to run this stage's programs in."""
        return self._on(self.mesh)


@jax.jit
def gather_pages(caches: list[PagedLayer], ids_K) -> list[PagedLayer]:
    return [PagedLayer(c.ckv_NPC[ids_K], c.krope_NPR[ids_K]) for c in caches]


@partial(jax.jit, donate_argnums=0)
def scatter_pages(caches: list[PagedLayer], pages: list[PagedLayer], ids_K) -> list[PagedLayer]:
    return [
        PagedLayer(c.ckv_NPC.at[ids_K].set(p.ckv_NPC), c.krope_NPR.at[ids_K].set(p.krope_NPR))
        for c, p in zip(caches, pages, strict=True)
    ]


def hand_off(src: Stage, dst: Stage, ids_K: np.ndarray) -> None:
    """Copies pages ``ids_K`` of ``src``'s pool into ``dst``'s (the same ids)."""
    with src.on():
        pages = gather_pages(src.caches, ids_K)
    if dst.mesh is not None:
        pages = jax.device_put(pages, NamedSharding(dst.mesh, P()))
    elif src.mesh is not None:
        pages = jax.device_put(pages, jax.devices()[0])
    with dst.on():
        dst.caches = scatter_pages(dst.caches, pages, ids_K)
