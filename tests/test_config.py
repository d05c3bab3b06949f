import pytest

from sdt_dist.config import ConfigError, check_layout, load_config
from tests.helpers import REPO, TINY


def test_tiny_yaml_loads_with_overrides():
    cfg = load_config(REPO / "launchers/configs/tiny.yaml", ["distill.ema_tau=0.999", "train.max_steps=7"])
    assert cfg.distill.ema_tau == 0.999 and cfg.train.max_steps == 7
    assert cfg.data.source.endswith("openwebtext-1000.jsonl.gz") and "${" not in cfg.data.source


@pytest.mark.parametrize("override, key", [
    ("distill.ema_tau=1.0", "distill.ema_tau"),
    ("distill.ema_tau=0", "distill.ema_tau"),
    ("distill.freeze_fractions=[0.3,0.2,0.1]", "distill.freeze_fractions"),
    ("distill.freeze_milestones=[0.1,0.5,1.0]", "distill.freeze_milestones"),
    ("distill.freeze_fractions=[0.1,0.2]", "distill.freeze_fractions"),
    ("model.num_attention_heads=5", "model.num_attention_heads"),
    ("parallel.tensor=3", "parallel.tensor"),
    ("model.dropout=1.5", "model.dropout"),
    ("distill.temperature=0", "distill.temperature"),
    ("distill.layerdrop_p=1", "distill.layerdrop_p"),
    ("distill.align_map=diagonal", "distill.align_map"),
    ("distill.teacher_gather=layer", "distill.teacher_gather"),
    ("model.bogus=1", "model.bogus"),
    ("bogus.key=1", "bogus"),
    ("train.max_steps=abc", "train.max_steps"),
    ("train.max_steps=1.5", "train.max_steps"),
    ("train.global_batch_size=6", "train.global_batch_size"),
    ("parallel.zero_stage=4", "parallel.zero_stage"),
    ("parallel.sequence_parallel=true", "parallel.sequence_parallel"),
    ("parallel.pipeline=2", "parallel.pipeline"),  # with ZeRO-2 below
])
def test_invalid_values_name_the_key(override, key):
    extra = ["parallel.zero_stage=2"] if override == "parallel.pipeline=2" else []
    with pytest.raises(ConfigError) as err:
        load_config(None, TINY + extra + [override])
    assert key in str(err.value)


def test_layout_checked_against_world_size():
    cfg = load_config(None, TINY + ["parallel.tensor=2", "train.global_batch_size=8"])
    assert check_layout(cfg, 4) == 2
    with pytest.raises(ConfigError, match="world size 3"):
        check_layout(cfg, 3)
    with pytest.raises(ConfigError, match="train.global_batch_size"):
        check_layout(load_config(None, TINY + ["train.global_batch_size=4"]), 8)


def test_sequence_parallel_needs_tensor_parallelism_and_a_divisible_sequence():
    sp = ["parallel.sequence_parallel=true"]
    with pytest.raises(ConfigError, match="parallel.tensor > 1"):
        load_config(None, TINY + sp)
    with pytest.raises(ConfigError, match="seq_length 18 is not divisible"):
        load_config(None, TINY + sp + ["parallel.tensor=4", "model.seq_length=18"])
    assert load_config(None, TINY + sp + ["parallel.tensor=2"]).parallel.sequence_parallel


def test_yaml_object_tags_are_refused(tmp_path):
    bad = tmp_path / "evil.yaml"
    bad.write_text("train: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_checkpoints_that_predate_align_reduce_and_freeze_embedding_keep_their_behaviour(tmp_path):
    """A recorded config without the keys means the behaviour it was trained with (sum, embedding frozen), for
    evaluation (run_config) and for a resume (the trainer adopts them before building the model)."""
    import json

    from sdt_dist.eval.evaluate import run_config
    from sdt_dist.trainer import adopt_checkpoint_legacy_values

    new = load_config(None, TINY)
    assert (new.distill.align_reduce, new.distill.freeze_embedding) == ("mean", False)  # today's defaults
    old = new.to_dict()
    del old["distill"]["align_reduce"], old["distill"]["freeze_embedding"]
    assert (run_config({"config": old}).distill.align_reduce, run_config({"config": old}).distill.freeze_embedding) \
        == ("sum", True)
    assert run_config({"config": new.to_dict()}).distill.align_reduce == "mean"  # recorded keys are kept

    ckpt = tmp_path / "checkpoints" / "step_00000010"
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text(json.dumps({"config": old}))
    resuming = load_config(None, TINY + ["train.resume=auto"])
    adopt_checkpoint_legacy_values(resuming, ckpt)
    assert (resuming.distill.align_reduce, resuming.distill.freeze_embedding) == ("sum", True)
    (ckpt / "meta.json").write_text(json.dumps({"config": new.to_dict()}))  # a current checkpoint: nothing adopted
    current = load_config(None, TINY)
    adopt_checkpoint_legacy_values(current, ckpt)
    assert (current.distill.align_reduce, current.distill.freeze_embedding) == ("mean", False)
    with pytest.raises(ConfigError, match="distill.align_reduce"):
        load_config(None, TINY + ["distill.align_reduce=max"])
