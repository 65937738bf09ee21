"""Prefill and decode on separate meshes (8 virtual CPU devices): prefill expert-parallel
over all 8, decode over 2; the pages move between the pools; the tokens equal the
single-device engine's."""

import jax
import numpy as np
from flax import nnx

from deepseek_jax.infer.engine import Engine
from deepseek_jax.infer.sampling import SamplingParams
from deepseek_jax.mesh import make_mesh
from deepseek_jax.model import Transformer
from deepseek_jax.presets import get_preset

CFG = get_preset("tiny")


def test_split_meshes_equal_single_mesh_engine():
    model = Transformer(CFG, rngs=nnx.Rngs(3))
    prompts = np.random.default_rng(0).integers(0, CFG.vocab_size, (4, 11)).tolist()
    shapes = dict(page_size=8, num_pages=17, max_batch=4, prefill_chunk=8, page_buckets=(4,))

    def run(engine):
        reqs = [engine.submit(p, SamplingParams(max_tokens=10)) for p in prompts[:2]]
        engine.step()  # the others join while the first two decode
        reqs += [engine.submit(p, SamplingParams(max_tokens=10, temperature=0.9, seed=5))
                 for p in prompts[2:]]  # fmt: skip
        engine.run_until_done()
        assert engine.alloc.in_use == 0
        return [r.output for r in reqs]

    single = run(Engine(model, **shapes, batch_buckets=(4,)))
    prefill_mesh = make_mesh(2, 4)
    decode_mesh = make_mesh(1, 2, devices=jax.devices()[:2])
    split = Engine(model, **shapes, prefill_mesh=prefill_mesh, decode_mesh=decode_mesh)
    assert split.prefill.batch_shards == 8 and split.decode.batch_shards == 2
    assert split.batch_buckets == (2, 4)
    experts = split.decode.state["layers"][1]["mlp"]["w_gate"][...]
    assert experts.sharding.mesh.size == 2 and len(experts.sharding.spec[0]) == 2  # EP over 2
    assert run(split) == single
