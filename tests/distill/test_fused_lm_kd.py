import pytest
import torch

from sdt_dist.distill.fused_lm_kd import fused_lm_loss, lm_kd_losses
from sdt_dist.distill.losses import kd_loss, lm_loss


def _inputs(seed: int, b: int = 3, s: int = 7, v: int = 13):
    g = torch.Generator().manual_seed(seed)
    # the model's logits are a transposed [s, b, V] tensor: not contiguous
    zs = (torch.randn(s, b, v, generator=g, dtype=torch.float64) * 3).transpose(0, 1)
    zt = torch.randn(b, s, v, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, v, (b, s), generator=g)
    mask = torch.ones(b, s)
    mask[1, 4:] = 0
    return zs, zt, labels, mask


@pytest.mark.parametrize("chunk", [4, None])  # several chunks, and the default (one here)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("contiguous", [False, True])
def test_fused_equals_separate_losses_values_and_gradients(chunk, temperature, contiguous):
    zs, zt, labels, mask = _inputs(0)
    zs = zs.contiguous() if contiguous else zs
    ref_in = zs.clone().requires_grad_(True)
    ref_lm, ref_kd = lm_loss(ref_in, labels, mask), kd_loss(ref_in, zt, mask, temperature)
    (ref_lm + 0.7 * ref_kd).backward()  # the separate losses on float64 logits: the reference
    got_in = zs.float().requires_grad_(True)
    lm, kd = (out := lm_kd_losses(got_in, zt.float(), labels, mask, temperature, 0.7, chunk_tokens=chunk)).lm, out.kd
    out.weighted.backward()  # LM + 0.7 KD: KD's gradient folded into LM's
    torch.testing.assert_close(lm.double(), ref_lm.double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(kd.double(), ref_kd.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.weighted.double(), (ref_lm + 0.7 * ref_kd).double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_in.grad.double(), ref_in.grad, rtol=1e-5, atol=1e-7)
    assert got_in.grad.shape == zs.shape and got_in.grad[1, 4:].abs().max() == 0  # padding gets no gradient


@pytest.mark.parametrize("chunk", [4, None])
@pytest.mark.parametrize("contiguous", [False, True])
def test_fused_lm_alone_equals_lm_loss_value_and_gradient(chunk, contiguous):
    """The plain step's LM term: the same pass without a teacher."""
    zs, _, labels, mask = _inputs(3)
    zs = zs.contiguous() if contiguous else zs
    ref_in = zs.clone().requires_grad_(True)
    ref = lm_loss(ref_in, labels, mask)
    (1.3 * ref).backward()  # float64 logits: the reference
    got_in = zs.float().requires_grad_(True)
    lm = fused_lm_loss(got_in, labels, mask, chunk_tokens=chunk)
    (1.3 * lm).backward()
    torch.testing.assert_close(lm.double(), ref.double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_in.grad.double(), ref_in.grad, rtol=1e-5, atol=1e-7)
    assert got_in.grad.shape == zs.shape and got_in.grad[1, 4:].abs().max() == 0  # padding gets no gradient


@pytest.mark.parametrize("kd", [True, False])
def test_fused_pass_on_bf16_logits_computes_in_fp32(kd):
    """bf16 logits (a bf16 run) are copied chunk by chunk into fp32 scratch: the values are those of the same
    logits in float64, and the gradient comes back in bf16, rounded once."""
    zs, zt, labels, mask = _inputs(4)
    zs, zt = zs.bfloat16(), zt.bfloat16()
    ref_in = zs.double().requires_grad_(True)
    ref_lm = lm_loss(ref_in, labels, mask)
    ref = ref_lm + 0.7 * kd_loss(ref_in, zt.double(), mask, 2.0) if kd else ref_lm
    ref.backward()
    got_in = zs.clone().requires_grad_(True)
    if kd:
        out = lm_kd_losses(got_in, zt, labels, mask, 2.0, 0.7, chunk_tokens=4)
        total, lm = out.weighted, out.lm
    else:
        total = lm = fused_lm_loss(got_in, labels, mask, chunk_tokens=4)
    total.backward()
    torch.testing.assert_close(lm.double(), ref_lm.double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(total.double(), ref.detach().double(), rtol=1e-6, atol=1e-6)
    assert got_in.grad.dtype == torch.bfloat16
    torch.testing.assert_close(got_in.grad.double(), ref_in.grad.bfloat16().double(), rtol=2**-7, atol=1e-6)


def test_fused_kd_is_zero_for_a_teacher_equal_to_the_student_and_reaches_the_student_only():
    zs, _, labels, mask = _inputs(1)
    z, z_lm = zs.float().requires_grad_(True), zs.float().requires_grad_(True)
    teacher = zs.float().clone().requires_grad_(True)
    out = lm_kd_losses(z, teacher, labels, mask, 2.0, 3.0, chunk_tokens=5)
    assert abs(out.kd.item()) < 1e-6 and not out.kd.requires_grad and not out.lm.requires_grad
    out.weighted.backward()
    fused_lm_loss(z_lm, labels, mask, chunk_tokens=5).backward()
    # KD at its minimum adds no gradient to LM's, and none reaches the teacher
    assert teacher.grad is None and (z.grad - z_lm.grad).abs().max() < 1e-6


def test_fused_kd_keeps_its_precision_for_a_teacher_close_to_the_student():
    """A small KL over a realistic vocabulary (the teacher a slightly moved student, as an EMA is): its value
    is a difference of log-sum-exps, computed without cancelling large terms."""
    g = torch.Generator().manual_seed(2)
    zs = (torch.randn(32, 2, 4096, generator=g, dtype=torch.float64) * 3 + 5).transpose(0, 1)
    zt = zs + 0.05 * torch.randn(zs.shape, generator=g, dtype=torch.float64)
    labels, mask = torch.randint(0, 4096, (2, 32), generator=g), torch.ones(2, 32)
    log_ps, log_pt = torch.log_softmax(zs / 2.0, -1), torch.log_softmax(zt / 2.0, -1)
    ref = 4.0 * (log_pt.exp() * (log_pt - log_ps)).sum(-1).mean()  # in float64
    kd = lm_kd_losses(zs.float(), zt.float(), labels, mask, 2.0, 1.0, chunk_tokens=24).kd
    assert 1e-4 < ref.item() < 1e-2
    torch.testing.assert_close(kd.double(), ref, rtol=4e-5, atol=0.0)  # summing two dot products: 7e-5
