import torch

from sdt_dist.distill.layerdrop import evenly_spaced_keep, layer_probs, sample_dropped
from tests.helpers import make_cfg, random_batch


def test_skip_rate_matches_p_and_is_reproducible():
    probs = layer_probs(0.1, 12)
    draws = [sample_dropped(probs, seed=7, step=s) for s in range(4000)]
    rate = sum(len(d) for d in draws) / (4000 * 12)
    assert abs(rate - 0.1) < 0.01  # 48k Bernoulli(0.1) draws: std 0.0014
    assert draws == [sample_dropped(probs, seed=7, step=s) for s in range(4000)]
    assert draws != [sample_dropped(probs, seed=8, step=s) for s in range(4000)]


def test_linear_schedule_increases_with_depth():
    probs = layer_probs(0.2, 4, "linear")
    assert probs == [0.05, 0.1, 0.15000000000000002, 0.2]
    counts = torch.zeros(4)
    for s in range(5000):
        for layer in sample_dropped(probs, 0, s):
            counts[layer - 1] += 1
    rates = counts / 5000
    assert all(abs(r - p) < 0.02 for r, p in zip(rates.tolist(), probs))
    assert sample_dropped(layer_probs(0.0, 4), 0, 0) == frozenset()


def test_evenly_spaced_keep():
    assert evenly_spaced_keep(12, 0) == list(range(1, 13))
    assert evenly_spaced_keep(12, 6) == [1, 3, 5, 8, 10, 12]
    assert evenly_spaced_keep(4, 3) == [4]


def test_teacher_never_drops_and_student_skips_layers(single_rank):
    from sdt_dist.model import GPTModel, student_layer_specs, teacher_layer_specs, transformer_config

    cfg = make_cfg("model.dropout=0")
    tc = transformer_config(cfg.model, cfg.parallel)
    teacher = GPTModel(tc, teacher_layer_specs(4), 128)
    assert all(layer.drop_prob == 0.0 for layer in teacher.layers)
    student = GPTModel(tc, student_layer_specs([0.5] * 4), 128)
    student.load_state_dict(teacher.state_dict())
    tokens = random_batch(cfg, 0)["tokens"]
    out = student(tokens, skip=frozenset({2, 3}))
    assert sorted(out.hidden) == [1, 4]
    # a skipped layer is the identity: layer 4 sees layer 1's output
    ref = teacher.layers[3](out.hidden[1])[0]
    torch.testing.assert_close(out.hidden[4], ref)
    assert sorted(teacher(tokens).hidden) == [1, 2, 3, 4]
