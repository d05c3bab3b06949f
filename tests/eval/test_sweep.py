"""The sweep: arms from a YAML, resume (finished arms are not redone), and aggregation, with fake steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from sdt_dist.config import ConfigError
from sdt_dist.eval.sweep import run
from sdt_dist.eval.sweep_spec import arms, load_spec
from sdt_dist.eval.sweep_tables import aggregate, markdown_tables, mean_std, metric, write_outputs
from tests.helpers import REPO

BASE = {
    "model": {"num_layers": 4, "hidden_size": 32, "num_attention_heads": 4, "vocab_size": 128, "seq_length": 16},
    "parallel": {"ds_config": None},
    "data": {"prepared": ["unused"]},
    "train": {"max_steps": 7, "micro_batch_size": 4, "global_batch_size": 4, "warmup_steps": 1},
}


def write_sweep(tmp_path: Path, **extra) -> Path:
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(BASE))
    sweep = {
        "base": str(tmp_path / "base.yaml"), "out_dir": str(tmp_path / "out"), "seeds": [1, 2],
        "eval": {"data": ["heldout=somewhere"], "prune": [1, 2]},
        "variants": [
            {"name": "baseline", "label": "GPT baseline", "set": ["distill.lambda_kd=0", "distill.lambda_sd=0"]},
            {"name": "sdt", "label": "SelfDistil-T"},
            {"name": "ema_only", "label": "EMA-only", "train_as": "baseline", "weights": "teacher"},
        ],
        "tables": [{"name": "t1", "title": "Table 1", "rows": ["baseline", "ema_only", "sdt"], "pruning_plot": True,
                    "columns": [{"label": "ppl", "metric": "datasets.heldout.ppl"},
                                {"label": "prune 2", "metric": "pruning.increase_pct.2"}]}],
        **extra,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


class FakeSteps:
    """Training writes a final checkpoint as the trainer does (meta.json last); evaluation an eval.json."""

    def __init__(self, fail: set[str] = frozenset()):
        self.trained: list[str] = []
        self.evaluated: list[str] = []
        self.fail = fail

    def train(self, spec, arm):
        self.trained.append(arm.name)
        if arm.name in self.fail:
            raise RuntimeError("boom")
        ckpt = arm.final_checkpoint
        (ckpt / "export").mkdir(parents=True)
        (ckpt / "export" / "student.safetensors").write_bytes(b"")
        (ckpt / "meta.json").write_text(json.dumps({"config_sha256": arm.config.sha256()}))

    def evaluate(self, spec, arm):
        self.evaluated.append(arm.name)
        value = 100.0 + arm.seed + (10.0 if arm.variant.name == "sdt" else 0.0)
        report = {"step": arm.config.train.max_steps, "weights": arm.variant.weights,
                  "datasets": {"heldout": {"ppl": value}},
                  "pruning": {"dataset": "heldout", "removed": [0, 1, 2],
                              "increase_pct": {"0": 0.0, "1": arm.seed, "2": 2.0 * arm.seed}}}
        arm.eval_dir.mkdir(parents=True, exist_ok=True)
        arm.eval_json.write_text(json.dumps(report))


def test_arms_and_overrides(tmp_path):
    spec = load_spec(write_sweep(tmp_path))
    selected = arms(spec)
    assert [a.name for a in selected] == ["baseline/seed1", "baseline/seed2", "sdt/seed1", "sdt/seed2",
                                          "ema_only/seed1", "ema_only/seed2"]
    ema = selected[4]
    assert ema.train_dir == selected[0].train_dir and ema.eval_dir != selected[0].eval_dir
    assert ema.config.distill.lambda_kd == 0 and ema.config.train.seed == 1
    assert f"train.out_dir={ema.train_dir}" in ema.overrides
    # asking for ema_only alone brings its training arm along
    assert [a.name for a in arms(spec, ["ema_only"], [2])] == ["baseline/seed2", "ema_only/seed2"]


def test_resume_skips_finished_arms(tmp_path):
    spec = load_spec(write_sweep(tmp_path))
    steps = FakeSteps()
    assert run(spec, arms(spec), steps.train, steps.evaluate, log=lambda _: None) == []
    assert steps.trained == ["baseline/seed1", "baseline/seed2", "sdt/seed1", "sdt/seed2"]  # ema_only reuses
    assert len(steps.evaluated) == 6

    again = FakeSteps()
    run(spec, arms(spec), again.train, again.evaluate, log=lambda _: None)
    assert again.trained == [] and again.evaluated == []

    # an interrupted arm: evaluated-but-deleted report -> evaluate only; lost final checkpoint -> retrain
    (spec.out_dir / "sdt" / "seed2" / "eval" / "eval.json").unlink()
    meta = spec.out_dir / "baseline" / "seed1" / "checkpoints" / "step_00000007" / "meta.json"
    meta.unlink()
    (meta.parent / "export" / "student.safetensors").unlink()
    (meta.parent / "export").rmdir()
    third = FakeSteps()
    run(spec, arms(spec), third.train, third.evaluate, log=lambda _: None)
    assert third.trained == ["baseline/seed1"]
    assert third.evaluated == ["baseline/seed1", "sdt/seed2", "ema_only/seed1"]


def test_grown_eval_section_reevaluates_without_training(tmp_path):
    spec = load_spec(write_sweep(tmp_path))
    steps = FakeSteps()
    run(spec, arms(spec, ["sdt"], [1]), steps.train, steps.evaluate, log=lambda _: None)
    spec.eval["prune"] = [1, 2, 3]
    again = FakeSteps()
    run(spec, arms(spec, ["sdt"], [1]), again.train, again.evaluate, log=lambda _: None)
    assert again.trained == [] and again.evaluated == ["sdt/seed1"]


def test_failures_do_not_stop_the_sweep_and_stale_checkpoints_are_refused(tmp_path):
    spec = load_spec(write_sweep(tmp_path))
    steps = FakeSteps(fail={"baseline/seed1"})
    failed = run(spec, arms(spec), steps.train, steps.evaluate, log=lambda _: None)
    assert failed == ["baseline/seed1", "ema_only/seed1"]  # ema_only/seed1 has no training to evaluate
    assert "sdt/seed2" in steps.evaluated

    # the YAML changes an arm's config: its old final checkpoint must not be reused
    path = write_sweep(tmp_path, set=["train.lr=1.0e-3"])
    spec = load_spec(path)
    logs: list[str] = []
    failed = run(spec, arms(spec, ["sdt"], [1]), FakeSteps().train, FakeSteps().evaluate, log=logs.append)
    assert failed == ["sdt/seed1"] and "another config" in logs[-1]
    assert logs[-1].startswith("[sdt-sweep] (1/1, 0 min) sdt/seed1: FAILED")  # progress: arm i of n, elapsed


def test_aggregate_mean_std_and_tables(tmp_path):
    spec = load_spec(write_sweep(tmp_path))
    steps = FakeSteps()
    run(spec, arms(spec), steps.train, steps.evaluate, log=lambda _: None)
    agg = aggregate(spec)
    sdt = agg["tables"]["t1"]["rows"]["sdt"]["columns"]["ppl"]
    assert sdt["values"] == [111.0, 112.0] and sdt["mean"] == 111.5
    assert sdt["std"] == pytest.approx(0.5 ** 0.5)
    md = markdown_tables(spec, agg)
    assert "| SelfDistil-T | 2 | 111.50 ± 0.71 | 3.0000 ± 1.4142 |" in md
    paths = write_outputs(spec)
    assert all(p.is_file() for p in paths) and any(p.suffix == ".png" for p in paths)


def test_metric_paths_and_mean_std():
    report = {"a": {"b": 2, "c": {"1": 3.5}}}
    assert metric(report, "a.b") == 2.0 and metric(report, "a.c.1") == 3.5
    assert metric(report, "a.x") is None and metric(report, "a.b.c") is None
    assert mean_std([4.0]) == (4.0, None)
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(2 ** 0.5))


@pytest.mark.parametrize("bad,message", [
    ({"bogus": 1}, "unknown sweep key"),
    ({"variants": [{"name": "a"}, {"name": "b", "train_as": "c"}]}, "train_as"),
    ({"tables": [{"name": "t", "rows": ["nope"], "columns": []}]}, "unknown variant"),
])
def test_bad_spec_is_rejected(tmp_path, bad, message):
    path = write_sweep(tmp_path)
    raw = yaml.safe_load(path.read_text())
    raw.update(bad)
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=message):
        load_spec(path)


def test_shipped_sweeps_resolve():
    """Every arm of every shipped sweep YAML is a valid training config."""
    for path in sorted((REPO / "launchers" / "configs" / "sweeps").glob("*.yaml")):
        spec = load_spec(path)
        selected = arms(spec)
        assert selected, path
        for table in spec.tables:
            assert set(table.rows) <= set(spec.variants), (path, table.name)


def test_learning_curves_average_the_seeds_validation_perplexity_against_tokens(tmp_path):
    from sdt_dist.eval.sweep_tables import learning_curves

    spec = load_spec(write_sweep(tmp_path))
    for seed, ppl in ((1, [500.0, 300.0]), (2, [520.0, 280.0])):
        run_dir = spec.out_dir / "sdt" / f"seed{seed}"
        run_dir.mkdir(parents=True)
        lines = [{"step": 1, "loss": 6.0}, {"step": 3, "loss": 5.0, "val_ppl": ppl[0]},
                 {"step": 6, "loss": 4.0, "val_ppl": ppl[1]}]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    curves = learning_curves(spec)["t1"]
    assert set(curves) == {"sdt"}  # no runs for the baseline; ema_only evaluates another arm's weights
    sdt = curves["sdt"]
    assert sdt["tokens"] == [3 * 4 * 16, 6 * 4 * 16]  # steps x global batch x sequence length
    assert sdt["ppl_mean"] == [510.0, 290.0] and sdt["seeds"] == [2, 2]
    assert sdt["ppl_std"] == pytest.approx([200 ** 0.5, 200 ** 0.5])
    assert (spec.out_dir / "t1_curves.png") in write_outputs(spec)


def test_a_run_moved_to_the_variant_that_now_names_its_config_is_reused(tmp_path):
    """An arm chosen as the new default recipe keeps its training: its directory moves to the default's
    variant, whose config differs only in train.out_dir; any other difference is still refused."""
    spec = load_spec(write_sweep(tmp_path))
    (arm,) = arms(spec, ["sdt"], [1])
    ckpt = arm.final_checkpoint
    (ckpt / "export").mkdir(parents=True)
    (ckpt / "export" / "student.safetensors").write_bytes(b"")
    elsewhere = arm.config.to_dict()
    elsewhere["train"]["out_dir"] = str(tmp_path / "out" / "sd_mean_0.3" / "seed1")
    (ckpt / "meta.json").write_text(json.dumps({"config_sha256": "0" * 64, "config": elsewhere}))
    assert arm.trained()
    elsewhere["train"]["lr"] = 1.0
    (ckpt / "meta.json").write_text(json.dumps({"config_sha256": "0" * 64, "config": elsewhere}))
    with pytest.raises(ConfigError, match="another config"):
        arm.trained()


def _log_curve(run_dir: Path, ppl: list[float]) -> None:
    lines = [{"step": 3, "loss": 5.0, "val_ppl": ppl[0]}, {"step": 6, "loss": 4.0, "val_ppl": ppl[1]}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_records_keep_tables_and_curves_when_run_directories_are_gone(tmp_path):
    """Each evaluated arm leaves a record; with every run directory deleted the tables and learning curves
    come out the same, a record follows its config into a renamed variant, and a record of another config
    is not used."""
    import shutil

    from sdt_dist.eval.sweep_tables import learning_curves

    spec = load_spec(write_sweep(tmp_path, records=str(tmp_path / "records")))
    run(spec, arms(spec), FakeSteps().train, FakeSteps().evaluate, log=lambda _: None)
    for seed, ppl in ((1, [500.0, 300.0]), (2, [520.0, 280.0])):
        _log_curve(spec.out_dir / "sdt" / f"seed{seed}", ppl)
    write_outputs(spec)
    assert sorted(p.relative_to(spec.records).as_posix() for p in spec.records.rglob("*.json")) == [
        f"{v}/seed{s}.json" for v in ("baseline", "ema_only", "sdt") for s in (1, 2)]
    before, curves_before = aggregate(spec), learning_curves(spec)
    shutil.rmtree(spec.out_dir)
    assert aggregate(spec) == before and learning_curves(spec) == curves_before
    assert before["tables"]["t1"]["rows"]["ema_only"]["seeds"] == [1, 2]  # evaluated teacher weights

    # the sdt arm becomes the default under another name: same config, so its records still count
    raw = yaml.safe_load(spec.path.read_text())
    raw["variants"][1]["name"] = "recipe"
    raw["tables"][0]["rows"][2] = "recipe"
    spec.path.write_text(yaml.safe_dump(raw))
    renamed = load_spec(spec.path)
    assert aggregate(renamed)["tables"]["t1"]["rows"]["recipe"]["columns"]["ppl"]["values"] == [111.0, 112.0]
    # ... but not once its config differs
    raw["variants"][1]["set"] = ["train.lr=1.0e-3"]
    spec.path.write_text(yaml.safe_dump(raw))
    assert aggregate(load_spec(spec.path))["tables"]["t1"]["rows"]["recipe"]["seeds"] == []


def test_a_group_curve_pools_exactly_with_seeds_that_have_their_own(tmp_path):
    """Seeds 1-2 known only as mean and std (a lost aggregate) and seed 3's own curve give the mean and
    sample std of all three."""
    import statistics

    from sdt_dist.eval.sweep_tables import learning_curves

    spec = load_spec(write_sweep(tmp_path, records=str(tmp_path / "records"), seeds=[1, 2, 3]))
    first_two = {3: [500.0, 520.0], 6: [300.0, 280.0]}
    (sdt1,) = arms(spec, ["sdt"], [1])
    group = {"config": sdt1.config.to_dict(), "seeds": [1, 2], "steps": [3, 6],
             "ppl_mean": [statistics.mean(first_two[s]) for s in (3, 6)],
             "ppl_std": [statistics.stdev(first_two[s]) for s in (3, 6)]}
    (spec.records / "old_name").mkdir(parents=True)
    (spec.records / "old_name" / "curve_group.json").write_text(json.dumps(group))
    (spec.out_dir / "sdt" / "seed3").mkdir(parents=True)
    _log_curve(spec.out_dir / "sdt" / "seed3", [530.0, 250.0])
    sdt = learning_curves(spec)["t1"]["sdt"]
    assert sdt["seeds"] == [3, 3]
    for i, values in enumerate(([500.0, 520.0, 530.0], [300.0, 280.0, 250.0])):
        assert sdt["ppl_mean"][i] == pytest.approx(statistics.mean(values))
        assert sdt["ppl_std"][i] == pytest.approx(statistics.stdev(values))


def test_a_recorded_config_from_before_a_new_key_is_the_same_run(tmp_path):
    """Configs recorded before a key existed mean its default (or its legacy value) for that key."""
    from sdt_dist.eval.sweep_spec import same_run

    spec = load_spec(write_sweep(tmp_path))
    (arm,) = arms(spec, ["sdt"], [1])
    old = arm.config.to_dict()
    del old["model"]["recompute"], old["logging"]["peak_flops"]
    assert same_run(old, arm.config)
    del old["distill"]["align_reduce"]  # predates align_reduce: it summed, today's default is mean
    assert not same_run(old, arm.config)
    assert not same_run({**arm.config.to_dict(), "bogus": {}}, arm.config)


def test_aggregate_reads_no_learning_curves(tmp_path):
    """The tables come from eval.json alone: a run's unreadable metrics.jsonl breaks its learning curve, not
    the tables."""
    from sdt_dist.eval.sweep_tables import learning_curves

    spec = load_spec(write_sweep(tmp_path))
    run(spec, arms(spec), FakeSteps().train, FakeSteps().evaluate, log=lambda _: None)
    for seed in (1, 2):
        (spec.out_dir / "sdt" / f"seed{seed}" / "metrics.jsonl").write_text('not json\n{"step": 1}\n')
    assert aggregate(spec)["tables"]["t1"]["rows"]["sdt"]["columns"]["ppl"]["values"] == [111.0, 112.0]
    with pytest.raises(ValueError, match="not a JSON object"):
        learning_curves(spec)


def test_record_index_reads_each_file_once_and_the_first_match_in_path_order_wins(tmp_path):
    from sdt_dist.eval.sweep_records import RecordIndex

    spec = load_spec(write_sweep(tmp_path, records=str(tmp_path / "records")))
    sdt1, sdt2 = arms(spec, ["sdt"])

    def put(variant: str, arm, ppl: float, weights: str = "student") -> None:
        path = spec.records / variant / f"seed{arm.seed}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"variant": variant, "seed": arm.seed, "weights": weights,
                                    "config": arm.config.to_dict(), "eval": {"ppl": ppl}, "curve": []}))

    put("b_renamed", sdt1, 1.0)
    put("a_renamed", sdt1, 2.0)
    put("a_renamed", sdt2, 3.0, weights="teacher")
    put("c_renamed", sdt2, 4.0)
    index = RecordIndex(spec.records)
    for _ in range(3):
        assert index.record(sdt1)["eval"]["ppl"] == 2.0  # a_renamed sorts before b_renamed
        assert index.record(sdt2)["eval"]["ppl"] == 4.0  # the teacher-weights record is another arm's
    (baseline1,) = arms(spec, ["baseline"], [1])
    assert index.record(baseline1) is None  # same seed and weights, another config
    assert index.files_read == 4
