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
