"""``cfg_for``: the one mapping of ``--model-size`` and ``--pooling`` to a ``GSNetCfg``."""

from __future__ import annotations

import pytest

from gsnet_deploy.contracts.model_size import ModelSize
from gsnet_deploy.model import cfg_for, paper_cfg, tiny_cfg


@pytest.mark.parametrize("pooling", [1, 2])
def test_cfg_for_picks_the_size_and_the_pooling(pooling: int) -> None:
    """Bugs caught: the sizes swapped, or the pooling dropped (the paper's numbers need 1, training 2)."""
    assert cfg_for(ModelSize.PAPER, pooling) == paper_cfg((pooling, pooling))
    assert cfg_for(ModelSize.TINY, pooling) == tiny_cfg((pooling, pooling))
    assert cfg_for(ModelSize.TINY, pooling) != cfg_for(ModelSize.PAPER, pooling)
    assert cfg_for(ModelSize.PAPER, pooling).aggregator.pooling == (pooling, pooling)


def test_cfg_for_defaults_to_the_inference_pooling() -> None:
    assert cfg_for(ModelSize.PAPER).aggregator.pooling == (1, 1)
