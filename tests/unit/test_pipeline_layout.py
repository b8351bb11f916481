"""The pipeline layer split against Megatron-LM's rules (worked examples from its formulas)."""

import pytest

from megatron.core.pipeline_parallel.layout import PipelineLayout


def test_even_split_interleaves_chunks_over_ranks():
    layout = PipelineLayout.build(8, pp_size=2, vp_size=2)
    assert layout.layer_counts == (2, 2, 2, 2)
    assert layout.rank_layers(0) == [0, 1, 4, 5] and layout.rank_layers(1) == [2, 3, 6, 7]
    assert layout.virtual_stages(1) == [1, 3]
    assert PipelineLayout.build(8, pp_size=2, layers_per_virtual_stage=1).layer_counts == (1,) * 8


def test_uneven_first_and_last_stages():
    assert PipelineLayout.build(8, pp_size=4, first_stage_layers=1, last_stage_layers=1).layer_counts == (1, 3, 3, 1)
    assert PipelineLayout.build(5, pp_size=2, first_stage_layers=1).layer_counts == (1, 4)
    # Megatron's interleaved uneven offsets: rank 0 chunk v starts at v * (first/V + middle/V + last/V).
    layout = PipelineLayout.build(8, pp_size=3, vp_size=2, first_stage_layers=2, last_stage_layers=2)
    assert layout.layer_counts == (1, 2, 1, 1, 2, 1)
    assert [layout.layers(k).start for k in layout.virtual_stages(0)] == [0, 4]
    assert [layout.layers(k).start for k in layout.virtual_stages(1)] == [1, 5]


def test_embedding_and_loss_count_as_layers():
    layout = PipelineLayout.build(6, pp_size=4, account_for_embedding=True, account_for_loss=True)
    assert layout.layer_counts == (1, 2, 2, 1)
    assert PipelineLayout.build(7, pp_size=4, account_for_embedding=True).layer_counts == (1, 2, 2, 2)


@pytest.mark.parametrize("kwargs, flag", [
    (dict(num_layers=6, pp_size=4), "--pipeline-model-parallel-size"),
    (dict(num_layers=8, pp_size=2, vp_size=3), "--virtual-pipeline-model-parallel-size"),
    (dict(num_layers=8, pp_size=2, layers_per_virtual_stage=3), "--num-layers-per-virtual-pipeline-stage"),
    (dict(num_layers=8, pp_size=4, first_stage_layers=1), "--decoder-first/last-pipeline-num-layers"),
    (dict(num_layers=8, pp_size=2, vp_size=2, layers_per_virtual_stage=2), "exclusive"),
    (dict(num_layers=8, pp_size=1, vp_size=2), "--pipeline-model-parallel-size > 1"),
])
def test_refusals_name_the_flag(kwargs, flag):
    with pytest.raises(ValueError, match=flag.replace("(", r"\(")):
        PipelineLayout.build(**kwargs)
