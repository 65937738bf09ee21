"""Abstract and sharded construction: shardings before data.

``nnx.eval_shape`` gives every parameter's shape and logical names without allocating;
``state_shardings`` maps the names through the rules table; the real initialiser then runs
under ``jit`` with those out-shardings, so each device only ever materialises its shard.
"""

from __future__ import annotations

import jax
from flax import nnx

from deepseek_jax.config import ModelConfig
from deepseek_jax.model import Transformer
from deepseek_jax.sharding import state_shardings


def abstract_model(cfg: ModelConfig, *, seed: int = 0, **options) -> Transformer:
    """The model with ShapeDtypeStruct leaves: no memory, any size (671B in well under 1 s).

    ``options``: the Transformer's keyword options (``remat``, ``layer_loop``).
    """
    return nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(seed), **options))


def init_model(
    cfg: ModelConfig, mesh: jax.sharding.Mesh, *, seed: int = 0, **options
) -> Transformer:
    """A model whose parameters are born sharded on ``mesh`` (``options`` as above)."""
    graphdef, abs_state = nnx.split(abstract_model(cfg, seed=seed, **options))
    shardings = state_shardings(abs_state, mesh)

    def init():
        return nnx.state(Transformer(cfg, rngs=nnx.Rngs(seed), **options))

    with jax.set_mesh(mesh):
        state = jax.jit(init, out_shardings=shardings)()
    return nnx.merge(graphdef, state)
