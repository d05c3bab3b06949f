"""sdt-generate's decoder and sampling, against GPTModel (the training model) as the reference."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import make_cfg, tiny_model


@pytest.fixture(scope="module", params=["true", "false"], ids=["tied", "untied"])
def models(request, single_rank):
    from sdt_dist.generate import CachedDecoder

    cfg = make_cfg("model.dropout=0", f"model.tie_embeddings={request.param}")
    gpt = tiny_model(cfg, seed=3)
    state = {k: v.detach().clone() for k, v in gpt.named_parameters()}
    return gpt, CachedDecoder(state, cfg.model, gpt.config.layernorm_epsilon)


def _tokens(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (2, n), generator=torch.Generator().manual_seed(seed))


def _close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert (ours - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()


def test_decoder_logits_equal_gptmodel(models):
    gpt, decoder = models
    tokens = _tokens(24)
    with torch.no_grad():
        ref = gpt(tokens).logits
    _close(decoder(tokens)[0], ref)


def test_kv_cache_gives_the_logits_of_the_whole_sequence(models):
    _, decoder = models
    tokens = _tokens(20, seed=1)
    full = decoder(tokens)[0]
    logits, cache = decoder(tokens[:, :7])  # a prompt, then one token at a time, then a chunk of 3
    parts = [logits]
    for i in range(7, 17):
        logits, cache = decoder(tokens[:, i:i + 1], cache)
        parts.append(logits)
    parts.append(decoder(tokens[:, 17:], cache)[0])
    _close(torch.cat(parts, dim=1), full)


def test_temperature_0_is_an_argmax_loop_over_gptmodel(models):
    from sdt_dist.generate import generate

    gpt, decoder = models
    ids = [5, 17, 3]
    expected = list(ids)
    with torch.no_grad():
        for _ in range(12):
            expected.append(int(gpt(torch.tensor([expected])).logits[0, -1].argmax()))
    assert generate(decoder, ids, 12, temperature=0) == expected[3:]
    assert generate(decoder, ids, 12, temperature=0.7, top_k=1, seed=9) == expected[3:]


def test_same_seed_same_tokens_another_seed_others(models):
    from sdt_dist.generate import generate

    _, decoder = models
    a = generate(decoder, [1, 2, 3], 30, temperature=1.0, seed=7)
    assert a == generate(decoder, [1, 2, 3], 30, temperature=1.0, seed=7)
    assert a != generate(decoder, [1, 2, 3], 30, temperature=1.0, seed=8)
    assert len(a) == 30


def test_generation_stops_at_the_end_of_document_and_avoids_ids_past_the_tokenizer(models):
    from sdt_dist.generate import generate

    _, decoder = models
    greedy = generate(decoder, [4, 9], 8, temperature=0)
    stop = greedy[-1]
    assert generate(decoder, [4, 9], 8, temperature=0, eod=stop) == greedy[:greedy.index(stop)]
    assert all(t < 40 for t in generate(decoder, [4, 9], 30, temperature=1.0, vocab_limit=40))


def test_top_k_and_top_p_cut_the_distribution_as_defined():
    from sdt_dist.generate import next_token

    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    g = torch.Generator().manual_seed(0)
    draws = lambda **kw: torch.tensor([next_token(logits, 1.0, generator=g, **kw) for _ in range(4000)])
    top_p = draws(top_k=None, top_p=0.75)  # 0.5 < 0.75 <= 0.5 + 0.3: tokens 0 and 1, renormalised
    assert set(top_p.tolist()) == {0, 1}
    assert abs((top_p == 0).float().mean().item() - 0.5 / 0.8) < 0.03
    top_k = draws(top_k=3, top_p=1.0)
    assert set(top_k.tolist()) == {0, 1, 2}
    assert abs((top_k == 2).float().mean().item() - 0.15 / 0.95) < 0.03
    assert set(draws(top_k=None, top_p=0.5).tolist()) == {0}
    assert next_token(logits, 0.0, None, 1.0, g) == 0
