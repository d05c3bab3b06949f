import torch

from tests.helpers import make_cfg


def test_rotary_frequencies_stay_fp32_under_zero3_bf16(single_rank):
    """zero.Init casts floating tensors created in a module's __init__ to the training dtype: the student's
    frequencies must still be the teacher's (built outside it), in fp32."""
    from sdt_dist.train_module import SDTrainModule

    tm = SDTrainModule(make_cfg("parallel.ds_config=ds_configs/bf16.json", "parallel.zero_stage=3"), single_rank)
    assert hasattr(next(tm.gpt.parameters()), "ds_id") and tm.dtype == torch.bfloat16
    student, teacher = tm.gpt.rope.inv_freq, tm.teacher.module.rope.inv_freq
    assert student.dtype == teacher.dtype == torch.float32
    assert torch.equal(student, teacher)
