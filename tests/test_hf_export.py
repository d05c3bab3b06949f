"""Hugging Face export from real checkpoints: transformers' GPT-NeoX gives our logits, greedy generate() gives
sdt-generate's text, AutoTokenizer encodes as sentencepiece; the checkpoint's DeepSpeed consolidation scripts
refuse. Checkpoints are written by `checkpoint.save` at one rank after a few training steps."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import OWT, make_cfg, random_batch, worker_env

try:
    import transformers
except ImportError:  # the [hf] extra; the checkpoint-folder tests below run without it
    transformers = None
pytestmark = pytest.mark.skipif(not OWT.is_file(), reason=f"{OWT} not present")
needs_hf = pytest.mark.skipif(transformers is None, reason="transformers not installed (pip install '.[hf]')")

VOCAB = 384
SHAPE = ["model.num_layers=3", "model.hidden_size=32", "model.num_attention_heads=4", f"model.vocab_size={VOCAB}",
         "model.seq_length=32", "model.dropout=0", "model.init_std=0.2", "distill.ema_tau=0.5",
         "distill.layerdrop_p=0", "train.lr=0.01", "train.warmup_steps=1"]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> Path:
    from sdt_dist.data.tokenizer import train_tokenizer

    return train_tokenizer(str(OWT), tmp_path_factory.mktemp("tok"), vocab_size=VOCAB, sample_mb=0.5, threads=1)


def _checkpoint(single_rank, sp_model: Path, root: Path, *overrides: str) -> Path:
    from sdt_dist import checkpoint
    from sdt_dist.data.tokenizer import Tokenizer
    from sdt_dist.train_module import SDTrainModule
    from sdt_dist.train_step import train_step

    cfg = make_cfg(*SHAPE, f"data.tokenizer={sp_model}", *overrides)
    tm = SDTrainModule(cfg, single_rank)
    for step in range(3):
        train_step(tm, [random_batch(cfg, step)], step)
    meta = {"config": cfg.to_dict(), "config_sha256": cfg.sha256(), "tokenizer_sha256": Tokenizer(sp_model).sha256,
            "world_size": single_rank.world_size, "layout": single_rank.describe(), "step": 3, "consumed_samples": 12}
    return checkpoint.save(tm, root / "checkpoints", 3, 12, meta, keep=1)


@pytest.fixture(scope="module")
def ckpts(single_rank, sp_model, tmp_path_factory) -> dict[str, Path]:
    return {kind: _checkpoint(single_rank, sp_model, tmp_path_factory.mktemp(kind),
                              f"model.tie_embeddings={str(kind == 'tied').lower()}") for kind in ("tied", "untied")}


@pytest.fixture(params=["tied", "untied"])
def ckpt(request, ckpts) -> Path:
    return ckpts[request.param]


def _ours(ckpt: Path, weights: str, tokens: torch.Tensor, skip: frozenset[int] = frozenset()) -> torch.Tensor:
    from sdt_dist.export import load_export

    gpt, _ = load_export(ckpt / "export", weights)
    with torch.no_grad():
        return gpt(tokens, skip=skip).logits


def _hf(out: Path, tokens: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


def _close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    scale = ours.abs().max().item()
    assert scale > 1.0  # weights large enough that the comparison means something
    assert (ours - theirs).abs().max().item() <= 1e-5 * scale


@needs_hf
@pytest.mark.parametrize("weights", ["student", "teacher"])
def test_transformers_gives_our_logits(ckpt, weights, tmp_path):
    from sdt_dist.hf_export import export_hf

    out = export_hf(ckpt, tmp_path / "hf", weights)
    config = json.loads((out / "config.json").read_text())
    tied = json.loads((ckpt / "export" / "model_config.json").read_text())["tie_embeddings"]
    assert config["architectures"] == ["GPTNeoXForCausalLM"] and config["tie_word_embeddings"] is tied
    assert {f.name for f in out.iterdir()} >= {"config.json", "model.safetensors", "generation_config.json",
                                                "tokenizer.json", "tokenizer_config.json"}
    assert all(f.stat().st_mode & 0o777 == 0o644 for f in out.iterdir())
    assert all(f.stat().st_mode & 0o777 == 0o644 for f in (ckpt / "export").iterdir())
    tokens = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(0))
    _close(_ours(ckpt, weights, tokens), _hf(out, tokens))


@needs_hf
def test_teacher_and_student_exports_differ(ckpt, tmp_path):
    from sdt_dist.hf_export import export_hf

    tokens = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(1))
    a = _hf(export_hf(ckpt, tmp_path / "s", "student"), tokens)
    b = _hf(export_hf(ckpt, tmp_path / "t", "teacher"), tokens)
    assert (a - b).abs().max() > 1e-3  # tau 0.5 after 3 steps: the export really picks the weights


@needs_hf
def test_pruned_export_is_our_model_with_those_layers_skipped(ckpt, tmp_path):
    from sdt_dist.hf_export import export_hf

    out = export_hf(ckpt, tmp_path / "hf", layers_to_keep=["1,3"])
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2
    tokens = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(2))
    _close(_ours(ckpt, "student", tokens, skip=frozenset({2})), _hf(out, tokens))


@needs_hf
def test_transformers_greedy_generate_is_sdt_generate_at_temperature_0(ckpt, sp_model, tmp_path, capsys):
    from sdt_dist.data.tokenizer import Tokenizer
    from sdt_dist.generate import main as generate_main
    from sdt_dist.hf_export import export_hf

    out = export_hf(ckpt, tmp_path / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(out)
    sp = Tokenizer(sp_model)
    prompt = "The city council said"
    ids = [sp.eod] + tok.encode(prompt)
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    new = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
    new = new[:new.index(sp.eod)] if sp.eod in new else new
    assert len(new) >= 3
    # sentencepiece's decode, not AutoTokenizer's: where generated byte-fallback tokens do not form valid UTF-8,
    # Hugging Face's ByteFallback decoder writes U+FFFD for each token of the whole run, sentencepiece only for
    # the bad bytes (valid text round-trips identically, see the tokenizer test)
    expected = prompt + sp.decode(new)
    for source in (ckpt, out):  # from the checkpoint (sdt-dist names) and from the exported folder
        assert generate_main([str(source), "--prompt", prompt, "--max-new-tokens", "12",
                              "--temperature", "0"]) == 0
        assert capsys.readouterr().out == expected + "\n"


@needs_hf
def test_autotokenizer_encodes_as_sentencepiece_and_decodes_back(ckpts, sp_model, tmp_path):
    from sdt_dist.data.tokenizer import Tokenizer
    from sdt_dist.hf_export import export_hf

    tok = transformers.AutoTokenizer.from_pretrained(export_hf(ckpts["tied"], tmp_path / "hf"))
    sp = Tokenizer(sp_model)
    with gzip.open(OWT, "rt", encoding="utf-8") as f:
        docs = [json.loads(next(f))["text"] for _ in range(200)]
    for doc in docs:
        ids = tok.encode(doc)
        assert ids == sp.encode(doc)
        assert tok.decode(ids) == doc  # spaces, newlines and byte-fallback characters kept
    assert tok.eos_token_id == sp.eod and tok.pad_token_id == sp.pad


@needs_hf
def test_bad_requests_exit_2_naming_the_problem(ckpts, tmp_path, capsys):
    from sdt_dist.hf_export import main

    ckpt = ckpts["tied"]
    assert main([str(ckpt), str(tmp_path / "a"), "--layers-to-keep", "3,1"]) == 2
    assert "increasing layer numbers in 1..3" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    assert main([str(ckpt), str(tmp_path / "full")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main([str(tmp_path), str(tmp_path / "b")]) == 2
    assert "no model_config.json" in capsys.readouterr().err


def test_deepspeeds_consolidation_script_refuses_and_points_at_the_export(ckpts):
    root = ckpts["untied"].parent
    script = root / "zero_to_fp32.py"
    assert script.is_file() and (root / "zero_to_torch.py").is_file()  # DeepSpeed wrote them (ZeRO-1), ours replaced
    proc = subprocess.run([sys.executable, str(script), str(root), "out"], capture_output=True, text=True,
                          env=worker_env(), timeout=60, cwd=root)
    assert proc.returncode == 1 and not (root / "out").exists()
    assert "export/" in proc.stderr and "sdt-export-hf" in proc.stderr and "frozen" in proc.stderr


# One 2-rank launch saves every model-parallel and ZeRO checkpoint the tests below read (tests/workers/).
FREEZE = ["train.max_steps=4", "distill.freeze_milestones=[0.5]", "distill.freeze_fractions=[0.67]"]  # 2 of 3
PARALLEL = {
    "tp2_tied": ["parallel.tensor=2", "model.tie_embeddings=true"],
    "tp2_untied": ["parallel.tensor=2", "model.tie_embeddings=false"],
    "pp2_untied": ["parallel.pipeline=2", "model.num_layers=4", "model.tie_embeddings=false"],
    "zero1_dp2_frozen": ["parallel.zero_stage=1", "train.global_batch_size=8", *FREEZE],
    "zero2_dp2_frozen": ["parallel.zero_stage=2", "train.global_batch_size=8", "model.tie_embeddings=false",
                         "distill.freeze_embedding=true", *FREEZE],
}


@pytest.fixture(scope="module")
def parallel_runs(sp_model, tmp_path_factory) -> dict[str, Path]:
    from tests.helpers import run_ranks

    root = tmp_path_factory.mktemp("parallel")
    run_ranks(2, "save_checkpoint.py", str(root), str(sp_model), "3", json.dumps(
        {name: [*SHAPE, *overrides] for name, overrides in PARALLEL.items()}), timeout=900)
    return {name: root / name for name in PARALLEL}


@needs_hf
@pytest.mark.slow
@pytest.mark.parametrize("name,layout", [("tp2_tied", "TP=2 PP=1"), ("tp2_untied", "TP=2 PP=1"),
                                         ("pp2_untied", "TP=1 PP=2")])
def test_export_from_a_model_parallel_checkpoint(single_rank, parallel_runs, name, layout, tmp_path):
    """2 real ranks: the export gathers the TP shards / pipeline stages; transformers gives our TP=1 logits."""
    from sdt_dist.hf_export import export_hf

    run = parallel_runs[name]
    ckpt = run / "checkpoints" / "step_00000003"
    assert f"world=2 {layout}" in json.loads((ckpt / "meta.json").read_text())["layout"]
    tied = json.loads((ckpt / "export" / "model_config.json").read_text())["tie_embeddings"]
    assert tied is (name == "tp2_tied")
    tokens = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(3))
    for weights in ("student", "teacher"):
        out = export_hf(run, tmp_path / weights, weights)
        assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is tied
        _close(_ours(ckpt, weights, tokens), _hf(out, tokens))


def test_tied_embeddings_under_pipeline_parallelism_are_refused_before_any_worker():
    """The embedding and the head live on different pipeline stages, so there is no tied PP checkpoint to export."""
    from sdt_dist.config import ConfigError, load_config
    from tests.helpers import TINY

    with pytest.raises(ConfigError, match="model.tie_embeddings: with parallel.pipeline=2 set it to false"):
        load_config(None, TINY + ["parallel.pipeline=2", "model.tie_embeddings=true"])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["zero1_dp2_frozen", "zero2_dp2_frozen"])
def test_zero_to_fp32_after_freezing_points_at_the_export(parallel_runs, name):
    """2 ranks, ZeRO-1/2, layers (and in one case the embedding) frozen: the frozen parameters left the optimizer,
    so DeepSpeed's script would rebuild a partial model; the one in the checkpoint folder refuses instead."""
    root = parallel_runs[name] / "checkpoints"
    ckpt = root / "step_00000003"
    assert torch.load(ckpt / "rank_00001.pt", weights_only=False)["frozen_layers"] == 2
    scripts = sorted(root.rglob("zero_to_*.py"))
    assert {p.name for p in scripts} == {"zero_to_fp32.py", "zero_to_torch.py"}, scripts
    for script in scripts:
        out = root.parent / f"consolidated_{script.stem}"
        proc = subprocess.run([sys.executable, str(script), str(root), str(out), "--tag", ckpt.name],
                              capture_output=True, text=True, env=worker_env(), timeout=120, cwd=root)
        assert proc.returncode != 0 and not out.exists(), proc.stdout[-2000:]
        assert "export/" in proc.stderr and "sdt-export-hf" in proc.stderr, proc.stderr[-2000:]
    assert (ckpt / "export" / "student.safetensors").is_file()  # where the message points
