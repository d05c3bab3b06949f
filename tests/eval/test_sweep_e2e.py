"""A real sweep: one tiny training run (1 rank, 4 steps) on OpenWebText-1000, evaluated twice (student and
EMA teacher); running the sweep again redoes nothing."""

from __future__ import annotations

import json

import pytest
import yaml

from sdt_dist.eval.sweep import main
from tests.helpers import OWT, REPO

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not OWT.is_file(), reason=f"{OWT} not present")]


def test_sweep_trains_evaluates_and_resumes(tmp_path, capsys):
    from sdt_dist.data.prepare import prepare_corpus

    prepared = prepare_corpus(str(OWT), tmp_path / "owt", vocab_size=4096, workers=2, progress=False)
    base = yaml.safe_load((REPO / "launchers" / "configs" / "tiny.yaml").read_text())
    base["parallel"]["ds_config"] = str(REPO / "ds_configs" / "zero1.json")
    base["data"] = {"prepared": [str(prepared)]}
    base["train"].update(max_steps=4, save_interval=2, eval_interval=2, warmup_steps=1, global_batch_size=8)
    base["logging"] = {"log_interval": 1, "tensorboard": False}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    sweep = {
        "base": str(tmp_path / "base.yaml"), "out_dir": str(tmp_path / "sweep"), "seeds": [7], "nproc": 1,
        "eval": {"data": [f"heldout={prepared}"], "prune": [1], "max_tokens": 2000},
        "variants": [{"name": "sdt", "label": "SelfDistil-T"},
                     {"name": "ema", "label": "EMA weights", "train_as": "sdt", "weights": "teacher"}],
        "tables": [{"name": "t", "rows": ["sdt", "ema"],
                    "columns": [{"label": "ppl", "metric": "datasets.heldout.ppl"}]}],
    }
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))

    main([str(tmp_path / "sweep.yaml")])
    run_dir = tmp_path / "sweep" / "sdt" / "seed7"
    assert (run_dir / "checkpoints" / "step_00000004" / "export" / "teacher.safetensors").is_file()
    reports = {v: tmp_path / "sweep" / v / "seed7" / "eval" / "eval.json" for v in ("sdt", "ema")}
    student, teacher = (json.loads(p.read_text()) for p in reports.values())
    assert student["weights"] == "student" and teacher["weights"] == "teacher"
    assert student["datasets"]["heldout"]["tokens_scored"] == 2000
    assert student["datasets"]["heldout"]["ppl"] != teacher["datasets"]["heldout"]["ppl"]
    assert student["compute"]["steps"] == 4 and student["compute"]["accelerator_hours"] > 0
    assert "SelfDistil-T | 1 |" in (tmp_path / "sweep" / "tables.md").read_text()
    assert " -m sdt_dist.cli --config " in (run_dir / "train.log").read_text().splitlines()[0]  # no checkout path

    log_size = (run_dir / "train.log").stat().st_size
    mtimes = {v: p.stat().st_mtime_ns for v, p in reports.items()}
    capsys.readouterr()
    main([str(tmp_path / "sweep.yaml")])
    out = capsys.readouterr().out
    assert out.count("finished, skipped") == 2
    assert (run_dir / "train.log").stat().st_size == log_size
    assert {v: p.stat().st_mtime_ns for v, p in reports.items()} == mtimes
