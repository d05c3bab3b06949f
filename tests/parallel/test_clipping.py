"""Under ZeRO-0 in fp32 the finite-step guard clips the gradients (from the norms it takes anyway) in place of
DeepSpeed: the result equals DeepSpeed's `clip_grad_norm_`, and the engine does not clip a second time."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import make_cfg, random_batch


@pytest.fixture(scope="module")
def tm(single_rank):
    from sdt_dist.train_module import SDTrainModule

    return SDTrainModule(make_cfg("parallel.zero_stage=0", "train.grad_clip=0.05"), single_rank)


def _random_grads(tm, seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    params = [p for p in tm.engine.module.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    return params


def test_the_guard_clips_as_deepspeed_does(tm):
    from deepspeed.runtime.utils import clip_grad_norm_

    from sdt_dist.parallel.finite_step import _engine_clips_fp32, _local_grads_bad

    assert _engine_clips_fp32(tm.engine)
    params = _random_grads(tm, 0)
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for c, p in zip(copies, params):
        c.grad = p.grad.clone()
    norm = clip_grad_norm_(copies, max_norm=0.05, mpu=tm.engine.mpu)
    assert norm.item() > 1.0  # far above the limit: the clipping is active
    assert _local_grads_bad(tm.engine, clip=True).item() == 0.0
    for c, p in zip(copies, params):
        torch.testing.assert_close(p.grad, c.grad, rtol=1e-6, atol=0.0)
    params[3].grad[0] = float("nan")
    assert _local_grads_bad(tm.engine, clip=True).item() == 1.0
    for p in params:
        p.grad = None


def test_a_zero0_step_is_clipped_once(tm):
    from sdt_dist.train_step import train_step

    calls = []
    clip = tm.engine.clip_fp32_gradients
    tm.engine.clip_fp32_gradients = lambda: calls.append(1) or clip()
    try:
        res = train_step(tm, [random_batch(tm.cfg, 0)], 0)
    finally:
        del tm.engine.clip_fp32_gradients
    assert not res.skipped and calls == []
