import torch

from sdt_dist.distill.losses import align_loss, kd_loss, lm_loss


def _kd_reference(zs, zt, mask, T):
    ps = torch.log_softmax(zs.double() / T, -1)
    pt = torch.log_softmax(zt.double() / T, -1)
    kl = (pt.exp() * (pt - ps)).sum(-1)
    return T**2 * (kl * mask).sum() / mask.sum()


def test_kd_is_zero_when_teacher_equals_student():
    z = torch.randn(2, 5, 11)
    assert kd_loss(z, z.clone(), torch.ones(2, 5), temperature=2.0).item() == 0.0


def test_kd_matches_float64_reference_and_is_a_mean_not_a_sum():
    g = torch.Generator().manual_seed(0)
    zs, zt = torch.randn(3, 7, 13, generator=g) * 3, torch.randn(3, 7, 13, generator=g) * 3
    mask = torch.ones(3, 7)
    mask[1, 4:] = 0
    for T in (1.0, 2.0, 4.0):
        got = kd_loss(zs, zt, mask, temperature=T)
        torch.testing.assert_close(got.double(), _kd_reference(zs, zt, mask, T), rtol=1e-5, atol=1e-6)
    # doubling the sequence with the same tokens leaves a mean unchanged (a sum would double)
    doubled = kd_loss(torch.cat([zs, zs], 1), torch.cat([zt, zt], 1), torch.cat([mask, mask], 1), 2.0)
    torch.testing.assert_close(doubled, kd_loss(zs, zt, mask, 2.0))


def test_kd_gradient_reaches_student_only():
    zs = torch.randn(2, 3, 5, requires_grad=True)
    zt = torch.randn(2, 3, 5, requires_grad=True)
    kd_loss(zs, zt, torch.ones(2, 3), 2.0).backward()
    assert zs.grad is not None and zs.grad.abs().sum() > 0 and zt.grad is None


def test_lm_loss_ignores_padding():
    logits = torch.randn(2, 4, 9)
    labels = torch.randint(0, 9, (2, 4))
    mask = torch.tensor([[1.0, 1, 1, 1], [1, 1, 0, 0]])
    ref = torch.nn.functional.cross_entropy(logits[mask.bool()], labels[mask.bool()])
    torch.testing.assert_close(lm_loss(logits, labels, mask), ref)


def test_lm_loss_on_the_models_transposed_logits_is_bitwise_the_contiguous_ones():
    # the model's [b, s, V] logits are a view of an [s, b, V] tensor; the loss walks them in that order
    torch.manual_seed(0)
    s, b, v = 6, 3, 11
    base = torch.randn(s, b, v, requires_grad=True)
    labels, mask = torch.randint(0, v, (b, s)), torch.ones(b, s)
    mask[0, -2:] = 0.0
    copy = base.detach().transpose(0, 1).contiguous().requires_grad_(True)
    view, contiguous = lm_loss(base.transpose(0, 1), labels, mask), lm_loss(copy, labels, mask)
    (view + contiguous).backward()
    assert torch.equal(view, contiguous)
    assert torch.equal(base.grad.transpose(0, 1), copy.grad)


def test_align_loss_closed_form_and_stop_gradient():
    s, b, d = 4, 2, 6
    pred = torch.randn(s, b, d, requires_grad=True)
    target = torch.randn(s, b, d, requires_grad=True)
    mask = torch.ones(b, s)
    mask[1, 3] = 0
    loss = align_loss({2: pred}, {5: target}, {2: 5}, mask)
    cos = torch.nn.functional.cosine_similarity(pred, target, dim=-1).transpose(0, 1)  # [b, s]
    ref = ((1 - cos) * mask).sum() / mask.sum()
    torch.testing.assert_close(loss, ref)
    loss.backward()
    assert pred.grad.abs().sum() > 0 and target.grad is None
    # identical directions give 0
    assert align_loss({1: target.detach() * 3}, {1: target.detach()}, {1: 1}, mask).abs().item() < 1e-6


def test_align_loss_gradient_equals_autograd_through_cosine_similarity_in_float64():
    # the alignment term's backward is written in closed form; autograd through torch's cosine_similarity
    # (same definition: x.y / (max(|x|, eps) max(|y|, eps))) is the reference, including a masked token, a
    # prediction of norm below eps, a zero prediction and a zero teacher state
    s, b, d = 6, 3, 16
    g = torch.Generator().manual_seed(3)
    pred = torch.randn(s, b, d, generator=g, dtype=torch.float64)
    target = torch.randn(s, b, d, generator=g, dtype=torch.float64)
    pred[1, 2] *= 1e-8
    pred[3, 1] = 0.0
    target[4, 0] = 0.0
    mask = torch.ones(b, s, dtype=torch.float64)
    mask[0, 5] = 0
    ours = pred.clone().requires_grad_(True)
    ref = pred.clone().requires_grad_(True)
    loss = align_loss({1: ours}, {1: target}, {1: 1}, mask)
    cos = torch.nn.functional.cosine_similarity(ref, target, dim=-1, eps=1e-6).transpose(0, 1)
    expected = ((1 - cos) * mask).sum() / mask.sum()
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    (loss * 1.7).backward()
    (expected * 1.7).backward()
    torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-10, atol=1e-12)
    assert ours.grad[5, 0].abs().max() == 0  # the masked token gets none
    assert ours.grad[1, 2].abs().max() > 0 and torch.isfinite(ours.grad).all()


def test_align_reduce_mean_is_the_sum_over_the_aligned_layers_divided_by_their_number():
    s, b, d = 5, 3, 8
    g = torch.Generator().manual_seed(7)
    preds = {n: torch.randn(s, b, d, generator=g) for n in (2, 3, 4)}
    targets = {n: torch.randn(s, b, d, generator=g) for n in (2, 3, 4)}
    mask = torch.ones(b, s)
    mask[0, -2:] = 0
    ident = {n: n for n in preds}
    per_layer = []
    for n in preds:  # closed form: mean over unmasked tokens of 1 - cos, layer by layer
        cos = torch.nn.functional.cosine_similarity(preds[n], targets[n], dim=-1).transpose(0, 1)
        per_layer.append(((1 - cos) * mask).sum() / mask.sum())
    total = align_loss(preds, targets, ident, mask, reduce="sum")
    mean = align_loss(preds, targets, ident, mask, reduce="mean")
    torch.testing.assert_close(total, sum(per_layer))
    torch.testing.assert_close(mean, sum(per_layer) / 3)
    # a pipeline stage holding one of the three aligned layers divides by the step's count, not its own
    one = align_loss({3: preds[3]}, targets, ident, mask, reduce="mean", num_aligned=3)
    torch.testing.assert_close(one, per_layer[1] / 3)
    # no aligned layer ran: zero, not a division by zero
    assert align_loss({}, targets, ident, mask, reduce="mean").item() == 0.0
