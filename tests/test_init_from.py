"""`train.init_from`: a new run starts from an export's or a Hugging Face folder's weights (student and teacher)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.helpers import full_student_params, make_cfg, tiny_model


@pytest.fixture(scope="module")
def source(single_rank, tmp_path_factory) -> tuple[dict[str, torch.Tensor], Path, Path]:
    """Weights unlike any seed's initialisation, as an sdt-dist export and as a GPT-NeoX folder."""
    from sdt_dist.export import export
    from sdt_dist.hf_export import neox_config, to_hf_state

    cfg = make_cfg("model.tie_embeddings=false")
    state = {k: v.detach().clone() for k, v in tiny_model(cfg, seed=11).named_parameters()}
    root = tmp_path_factory.mktemp("init")
    export(root / "export", cfg.model, state, state)
    hf = root / "hf"
    hf.mkdir()
    save_file(to_hf_state(state, list(range(1, cfg.model.num_layers + 1))), str(hf / "model.safetensors"))
    (hf / "config.json").write_text(json.dumps(neox_config(cfg.model, cfg.model.num_layers, 1e-5, 1, 2)))
    return state, root / "export", hf


@pytest.mark.parametrize("kind,zero", [("export", 1), ("hf", 1), ("export", 3)])
def test_student_and_teacher_start_from_the_source_weights(single_rank, source, kind, zero):
    from sdt_dist.train_module import SDTrainModule

    state, export_dir, hf = source
    cfg = make_cfg("model.tie_embeddings=false", f"parallel.zero_stage={zero}",
                   f"train.init_from={export_dir if kind == 'export' else hf}")
    tm = SDTrainModule(cfg, single_rank)
    names = [n for n, _ in tm.gpt.named_parameters()]
    expected = [state[n] for n in names]
    assert all(torch.equal(a, b) for a, b in zip(full_student_params(tm), expected))
    assert all(torch.equal(a, b) for a, b in zip(tm.teacher.full_parameters(), expected))


def test_another_architecture_is_a_config_error_naming_the_key(source):
    from sdt_dist.config import ConfigError
    from sdt_dist.init_from import check_compatible

    _, export_dir, _ = source
    cfg = make_cfg("model.tie_embeddings=false", "model.num_layers=2", f"train.init_from={export_dir}")
    with pytest.raises(ConfigError, match=r"train.init_from: .* model.num_layers 2 here, 4 there"):
        check_compatible(cfg.train.init_from, cfg.model)
    with pytest.raises(ConfigError, match="train.init_from: .*no model_config.json"):
        check_compatible(export_dir.parent / "nothing", cfg.model)
