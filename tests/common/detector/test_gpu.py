"""CUDA path: bf16 autocast + channels_last training and inference (gpu marker)."""

from __future__ import annotations

import math

import pytest
import torch

from common.detector.engine import evaluate, prepare_model
from common.detector.model import ModelConfig, build_detector
from common.detector.recipe import ModelEMA, train_one_epoch
from common.imaging.data import collate
from common.keys import CPM_MASS

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_cuda_bf16_channels_last_train_and_eval():
    from tests.common.detector.test_engine import SquareSet

    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = prepare_model(build_detector(ModelConfig(arch="resnet18")), dev)
    assert model.backbone.body.conv1.weight.is_contiguous(
        memory_format=torch.channels_last
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ema = ModelEMA(model, 0.9)
    loader = torch.utils.data.DataLoader(SquareSet(8), batch_size=4, collate_fn=collate)
    stats = train_one_epoch(model, loader, opt, device=dev, amp=True, ema=ema)
    assert stats.steps == 2 and stats.skipped_steps == 0
    assert math.isfinite(stats.mean_loss)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    m = evaluate(model, SquareSet(4), dev, n_boot=10)
    assert 0.0 <= m[CPM_MASS] <= 1.0
