"""Every schedule's loss, gradients and MoE loads equal the unpipelined model's to float32
rounding on 4 stages, mesh (stage, node, gpu) = (4, 1, 2): at the fewest
micro-batches each schedule takes (warm-up and cool-down are then the whole table), with
an uneven layer split (``pipeline_equal.layers_for``). The fast cases are split by stage
count over two files so that the two test workers share them."""

import pytest

from tests.pipeline_equal import SCHEDULES, check_equal, fewest_microbatches, layers_for


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("mesh_shape", [(4, 1, 2)], ids=["4x1x2"])
def test_schedule_equals_unpipelined(name, mesh_shape):
    stage = mesh_shape[0]
    check_equal(name, mesh_shape, layers_for(name, stage), fewest_microbatches(name, stage))
