"""`sdt-eval` end to end on a synthetic run directory (an export, meta.json, metrics.jsonl) and a raw text
file, with a small tokenizer trained here: JSON, Markdown and PNGs, and the tokenizer check."""

from __future__ import annotations

import json
import random

import pytest

from sdt_dist.eval.cli import main
from sdt_dist.export import export
from tests.helpers import make_cfg, tiny_model

WORDS = "the of and to in a is that for it as was with be by on not he this are or his from at which".split()


@pytest.fixture(scope="module")
def text_and_tokenizer(tmp_path_factory):
    from sdt_dist.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("text")
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(400)]
    (root / "corpus.txt").write_text("\n".join(lines) + "\n")
    (root / "heldout.txt").write_text("\n".join(lines[:40]) + "\n")
    model = train_tokenizer(str(root / "corpus.txt"), root / "tok", vocab_size=300, threads=1)
    return root / "heldout.txt", model


def make_run(tmp_path, tokenizer_sha: str):
    cfg = make_cfg("model.vocab_size=320", "model.num_layers=4", "distill.freeze_milestones=[0.5]",
                   "distill.freeze_fractions=[0.5]", "model.tie_embeddings=false", "train.global_batch_size=8")
    gpt = tiny_model(cfg)
    step = tmp_path / "run" / "checkpoints" / "step_00000020"
    weights = {k: v for k, v in gpt.state_dict().items() if v is not None}  # megatron's empty _extra_state
    export(step / "export", cfg.model, weights, weights)
    meta = {"config": cfg.to_dict(), "tokenizer_sha256": tokenizer_sha, "world_size": 2, "layout": "world=2",
            "step": 20, "consumed_samples": 80}
    (step / "meta.json").write_text(json.dumps(meta))
    (tmp_path / "run" / "checkpoints" / "latest").write_text(step.name)
    records = [{"step": s, "step_time_s": 0.1, "frozen_layers": 0 if s <= 10 else 2} for s in range(5, 21, 5)]
    (tmp_path / "run" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return tmp_path / "run", step


def test_cli_writes_report(single_rank, tmp_path, text_and_tokenizer, capsys):
    from sdt_dist.data.tokenizer import load_tokenizer

    heldout, tok_model = text_and_tokenizer
    run_dir, step = make_run(tmp_path, load_tokenizer(tok_model).sha256)
    out = tmp_path / "eval"
    main([str(run_dir), "--data", f"held={heldout}", "--tokenizer", str(tok_model), "--prune", "1,2",
          "--out", str(out)])
    report = json.loads((out / "eval.json").read_text())
    assert report["checkpoint"] == str(step) and report["step"] == 20
    held = report["datasets"]["held"]
    assert held["tokens_scored"] > 100 and held["ppl"] > 1 and 0 <= held["ece"] <= 1
    assert sum(b["count"] for b in held["bins"]) == held["tokens_scored"] and len(held["bins"]) == 10
    assert report["pruning"]["removed"] == [0, 1, 2] and report["pruning"]["increase_pct"]["0"] == 0.0
    c = report["compute"]
    assert c["tokens_seen"] == 80 * 16 and c["accelerator_hours"] == pytest.approx(20 * 0.1 * 2 / 3600)
    assert c["frozen_timeline"] == [[1, 0], [11, 2]] and 0 < c["freezing_compute_ratio"] < 1
    for name in ("eval.md", "reliability_held.png", "pruning.png"):
        assert (out / name).stat().st_size > 0
    assert "| held |" in capsys.readouterr().out


def test_cli_refuses_another_tokenizer(single_rank, tmp_path, text_and_tokenizer):
    heldout, tok_model = text_and_tokenizer
    run_dir, _ = make_run(tmp_path, "0" * 64)
    with pytest.raises(SystemExit) as e:
        main([str(run_dir), "--data", str(heldout), "--tokenizer", str(tok_model), "--out", str(tmp_path / "e")])
    assert e.value.code == 2
