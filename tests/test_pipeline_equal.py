"""Every schedule's loss, gradients and MoE loads equal the unpipelined model's to float32
rounding on 2 stages, meshes (stage, node, gpu) = (2, 2, 2) and (slow) (2, 1, 4): at the fewest
micro-batches each schedule takes (warm-up and cool-down are then the whole table), with
an uneven layer split (``pipeline_equal.layers_for``). The fast cases are split by stage
count over two files so that the two test workers share them."""

import pytest

from tests.pipeline_equal import SCHEDULES, check_equal, fewest_microbatches, layers_for


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize(
    "mesh_shape",
    # (2, 1, 4) runs in make test-all: every schedule also runs on 2 stages over two
    # nodes here and on 4 stages over one node, (4, 1, 2), in test_pipeline_equal4.
    [(2, 2, 2), pytest.param((2, 1, 4), marks=pytest.mark.slow)],
    ids=["2x2x2", "2x1x4"],
)
def test_schedule_equals_unpipelined(name, mesh_shape):
    stage = mesh_shape[0]
    check_equal(name, mesh_shape, layers_for(name, stage), fewest_microbatches(name, stage))
