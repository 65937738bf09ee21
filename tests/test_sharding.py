"""Mesh construction and the logical-to-mesh rules table."""

import jax
import pytest
from jax.sharding import PartitionSpec as P

from deepseek_jax.mesh import make_mesh
from deepseek_jax.sharding import logical_to_spec


def test_mesh_shapes():
    m = make_mesh(2, 4)
    assert dict(m.shape) == {"node": 2, "gpu": 4}
    assert all(t == jax.sharding.AxisType.Explicit for t in m.axis_types)
    m3 = make_mesh(2, 2, stage=2)
    assert m3.axis_names == ("stage", "node", "gpu")
    assert dict(make_mesh().shape) == {"node": 1, "gpu": 8}  # one process = one node


@pytest.mark.parametrize("node, gpu, stage", [(2, 3, 1), (4, 4, 1), (2, 4, 2), (0, 8, 1)])
def test_mesh_size_mismatch(node, gpu, stage):
    with pytest.raises(ValueError, match="does not match the 8 available devices"):
        make_mesh(node, gpu, stage)


def test_rules():
    axes = ("node", "gpu")
    assert logical_to_spec(("batch", None, "embed"), mesh_axes=axes) == P(
        ("node", "gpu"), None, None
    )
    assert logical_to_spec(("layers", "expert", "embed", "mlp"), mesh_axes=axes) == P(
        None, ("node", "gpu"), None, None
    )
    assert logical_to_spec(("layers", "embed"), mesh_axes=("stage",) + axes) == P("stage", None)


def test_rules_collision_and_unknown():
    with pytest.raises(ValueError, match="'batch' and 'expert' both map to mesh axis 'node'"):
        logical_to_spec(("batch", "expert"))
    with pytest.raises(ValueError, match="no rule"):
        logical_to_spec(("bogus",))
