import pytest

from sdt_dist.config import DistillConfig, TrainConfig
from sdt_dist.distill.schedules import aligned_layers_at, frozen_layers_at, layer_map, lr_at, tau_at


def test_freezing_milestones_10_20_30_percent():
    d = DistillConfig(freeze_milestones=[0.1, 0.2, 0.3], freeze_fractions=[0.1, 0.2, 0.3])  # the paper's schedule
    got = [frozen_layers_at(s, d, 12, 100) for s in (0, 9, 10, 19, 20, 29, 30, 99)]
    assert got == [0, 0, 1, 1, 2, 2, 3, 3]  # floor(0.1*12)=1, floor(0.2*12)=2, floor(0.3*12)=3
    assert [frozen_layers_at(s, DistillConfig(), 12, 100) for s in (0, 50, 99)] == [0, 0, 0]  # default: none


def test_kappa_ramps_from_top_to_all_unfrozen():
    d = DistillConfig(kappa_start_layers=1, kappa_ramp_frac=0.5)
    assert aligned_layers_at(0, d, 8, 100, frozen=0) == [8]
    assert aligned_layers_at(50, d, 8, 100, frozen=0) == list(range(1, 9))
    assert aligned_layers_at(99, d, 8, 100, frozen=3) == [4, 5, 6, 7, 8]
    assert aligned_layers_at(10, DistillConfig(lambda_sd=0.0), 8, 100, 0) == []


def test_tau_constant_annealed_and_off():
    assert tau_at(50, DistillConfig(ema_tau=0.99), 100) == 0.99
    d = DistillConfig(ema_tau=0.99, ema_tau_end=0.999, ema_anneal_frac=0.5)
    assert tau_at(0, d, 100) == 0.99 and tau_at(50, d, 100) == pytest.approx(0.999)
    assert tau_at(25, d, 100) == pytest.approx(0.9945)
    assert tau_at(10, DistillConfig(ema=False), 100) == 0.0


def test_lr_warmup_then_cosine():
    t = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert lr_at(0, t) == pytest.approx(0.1) and lr_at(9, t) == pytest.approx(1.0)
    assert lr_at(60, t) == pytest.approx(0.55) and lr_at(110, t) == pytest.approx(0.1)


def test_layer_maps():
    assert layer_map("identity", 3, 3) == {1: 1, 2: 2, 3: 3}
    assert layer_map("strided", 3, 6) == {1: 2, 2: 4, 3: 6}
    assert layer_map("nearest", 4, 6) == {1: 2, 2: 3, 3: 4, 4: 6}
    with pytest.raises(ValueError):
        layer_map("strided", 4, 6)
