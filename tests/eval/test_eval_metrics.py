"""ECE and perplexity against hand-computed values and independent computations."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sdt_dist.eval.metrics import EvalAccumulator, TokenStats, bin_index, ece, token_stats


def test_ece_hand_computed():
    # bins (0.9,1]: 2 tokens, acc 0.5, conf 0.95 -> gap 0.45; (0.6,0.7]: 2, acc 1, conf 0.65 -> 0.35;
    # (0.2,0.3]: 1, acc 0, conf 0.25 -> 0.25.  ECE = (2*0.45 + 2*0.35 + 0.25) / 5 = 0.37
    conf = torch.tensor([0.95, 0.95, 0.65, 0.65, 0.25], dtype=torch.float64)
    correct = torch.tensor([1, 0, 1, 1, 0])
    assert ece(conf, correct) == pytest.approx(0.37, abs=1e-12)


def test_perfectly_calibrated_logits_give_zero():
    # vocab 2: logits (log 3, 0) -> p = (0.75, 0.25); 3 of 4 labels are the argmax: accuracy 0.75.
    # logits (log 9, 0) -> p = 0.9; 9 of 10 correct.
    rows = [([math.log(3.0), 0.0], [0, 0, 0, 1]), ([math.log(9.0), 0.0], [0] * 9 + [1])]
    logits = torch.tensor([z for z, labels in rows for _ in labels]).unsqueeze(0)
    labels = torch.tensor([lab for _, labels in rows for lab in labels]).unsqueeze(0)
    stats = token_stats(logits, labels)
    assert stats.confidence[0, :4].tolist() == pytest.approx([0.75] * 4)
    acc = EvalAccumulator()
    acc.update(stats)
    assert acc.ece == pytest.approx(0.0, abs=1e-6)
    assert acc.accuracy == pytest.approx(12 / 14)


def test_always_confident_wrong():
    # p = 0.9 on token 0 every time, the label is always 1: accuracy 0, ECE = 0.9
    logits = torch.tensor([math.log(9.0), 0.0]).expand(3, 5, 2)
    labels = torch.ones(3, 5, dtype=torch.long)
    acc = EvalAccumulator()
    acc.update(token_stats(logits, labels))
    assert acc.accuracy == 0.0
    assert acc.ece == pytest.approx(0.9, abs=1e-6)
    assert acc.mean_nll == pytest.approx(math.log(10.0), abs=1e-6)  # -log 0.1


def test_bin_edges_follow_guo_et_al():
    # bins are ((m-1)/10, m/10]: 0.1 is in the first bin, 1.0 in the last, 0 is clamped to the first
    conf = torch.tensor([0.0, 0.05, 0.1, 0.1000001, 0.5, 0.95, 1.0], dtype=torch.float64)
    assert bin_index(conf).tolist() == [0, 0, 0, 1, 4, 9, 9]


def test_token_stats_match_full_softmax_with_ties():
    g = torch.Generator().manual_seed(0)
    logits = torch.randint(-3, 3, (4, 7, 11), generator=g).float()  # small integers: many ties
    labels = torch.randint(0, 11, (4, 7), generator=g)
    stats = token_stats(logits, labels)
    logp = torch.log_softmax(logits.double(), dim=-1)
    assert torch.allclose(stats.nll.double(), -logp.gather(-1, labels[..., None]).squeeze(-1), atol=1e-6)
    assert torch.allclose(stats.confidence.double(), logp.exp().max(dim=-1).values, atol=1e-6)
    assert torch.equal(stats.correct, logits.argmax(dim=-1) == labels)


def test_loss_mask_excludes_tokens():
    logits = torch.tensor([[[5.0, 0.0], [0.0, 5.0]]])
    labels = torch.tensor([[0, 0]])
    acc = EvalAccumulator()
    acc.update(token_stats(logits, labels), loss_mask=torch.tensor([[1.0, 0.0]]))
    assert acc.tokens == 1 and acc.accuracy == 1.0


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.floats(0.0, 1.0), st.booleans()), min_size=1, max_size=60), st.integers(1, 59))
def test_accumulating_in_pieces_equals_all_at_once(pairs, cut):
    conf = torch.tensor([c for c, _ in pairs], dtype=torch.float64)
    correct = torch.tensor([k for _, k in pairs])
    whole = ece(conf, correct)
    acc = EvalAccumulator()
    for part in (slice(0, cut), slice(cut, None)):
        c = conf[part]
        acc.update(TokenStats(nll=torch.zeros_like(c), confidence=c, correct=correct[part]))
    assert 0.0 <= whole <= 1.0
    assert acc.ece == pytest.approx(whole, abs=1e-12)
    assert acc.tokens == len(pairs)


def test_perplexity_is_exp_mean_nll_over_every_token(single_rank):
    from sdt_dist.eval.evaluate import evaluate_tokens
    from tests.helpers import make_cfg, tiny_model

    cfg = make_cfg()
    model = tiny_model(cfg)
    s = cfg.model.seq_length
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.model.vocab_size, (3 * s + 6,), generator=g)  # 3 windows + a 5-token tail
    acc = evaluate_tokens(model, tokens, s, batch_size=2)

    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(tokens) - 1, s):
            window = tokens[start : start + s + 1]
            logp = torch.log_softmax(model(window[None, :-1]).logits.double(), dim=-1)[0]
            nll -= logp.gather(-1, window[1:, None]).sum().item()
            count += len(window) - 1
    assert acc.tokens == count == len(tokens) - 1
    assert acc.perplexity == pytest.approx(math.exp(nll / count), rel=1e-6)
