"""Hugging Face export: an sdt-dist export -> a `GPTNeoXForCausalLM` folder (`sdt-export-hf`).

Our decoder (pre-LN LayerNorm with biases, RoPE on the whole head with rotated halves, exact-GELU MLP,
biased linears, unbiased head, tied or untied embedding) is GPT-NeoX with `use_parallel_residual=False`
and `partial_rotary_factor=1`; megatron's fused QKV rows are laid out per head as [q, k, v], as GPT-NeoX's
are, so the weights map by name alone. The export is TP/PP/ZeRO-independent already, so any checkpoint
converts the same way, without torch.distributed.

The tokenizer is built from our sentencepiece model by transformers' SentencePiece converter (it follows the
model's own normalizer: identity, no dummy prefix, byte fallback, "\\n" a piece of its own) and written with
`save_pretrained`. The sentencepiece model is kept next to it as `sdt_tokenizer.model`, so that
`sdt-generate` reads the folder without transformers. Two differences remain, both outside ordinary text:
`encode` reads the literal text "<|endoftext|>" as the end-of-document token (sentencepiece spells it out), and
`decode` turns a run of byte-fallback tokens that is not valid UTF-8 into one U+FFFD per token (sentencepiece
keeps the valid bytes of the run).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sdt_dist.config import ModelConfig
from sdt_dist.export import checkpoint_tokenizer, locate_export, read_model_config

SP_MODEL_NAME = "sdt_tokenizer.model"
# transformers version the export was checked against (logits, generate, tokenizer round trips): pyproject's [hf]
HF_VERSION = "5.24.0"

_LAYER_NAMES = {  # ours (under layers.N.) -> GPT-NeoX's (under gpt_neox.layers.N.)
    "input_layernorm": "input_layernorm",
    "self_attention.linear_qkv": "attention.query_key_value",
    "self_attention.linear_proj": "attention.dense",
    "pre_mlp_layernorm": "post_attention_layernorm",
    "mlp.linear_fc1": "mlp.dense_h_to_4h",
    "mlp.linear_fc2": "mlp.dense_4h_to_h",
}
_TOP_NAMES = {
    "embedding.weight": "gpt_neox.embed_in.weight",
    "final_norm.weight": "gpt_neox.final_layer_norm.weight",
    "final_norm.bias": "gpt_neox.final_layer_norm.bias",
    "output_layer.weight": "lm_head.weight",
}


def to_hf_state(state: dict[str, torch.Tensor], keep: list[int]) -> dict[str, torch.Tensor]:
    """GPT-NeoX names for our weights, keeping the 1-based layers `keep` (renumbered from 0, in order)."""
    out = {}
    for name, tensor in state.items():
        if name in _TOP_NAMES:
            out[_TOP_NAMES[name]] = tensor
            continue
        _, index, rest = name.split(".", 2)
        module, kind = rest.rsplit(".", 1)
        if int(index) + 1 in keep:
            out[f"gpt_neox.layers.{keep.index(int(index) + 1)}.{_LAYER_NAMES[module]}.{kind}"] = tensor
    return out


def from_hf_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our names for GPT-NeoX weights (the inverse of `to_hf_state` with every layer kept)."""
    top = {v: k for k, v in _TOP_NAMES.items()}
    layer = {v: k for k, v in _LAYER_NAMES.items()}
    out = {}
    for name, tensor in state.items():
        if name in top:
            out[top[name]] = tensor
            continue
        if not name.startswith("gpt_neox.layers."):
            raise ValueError(f"{name}: not a GPT-NeoX weight sdt-dist knows")
        index, rest = name[len("gpt_neox.layers."):].split(".", 1)
        module, kind = rest.rsplit(".", 1)
        out[f"layers.{index}.{layer[module]}.{kind}"] = tensor
    return out


def check_architecture(model_cfg: ModelConfig) -> float:
    """Refuse to export if our decoder ever stops being GPT-NeoX's; returns the LayerNorm epsilon."""
    import torch.nn.functional as F

    from sdt_dist.config import ParallelConfig
    from sdt_dist.model import transformer_config

    tc = transformer_config(model_cfg, ParallelConfig(tensor=1, pipeline=1, zero_stage=0))
    same = (tc.activation_func is F.gelu and not tc.gated_linear_unit and tc.add_bias_linear
            and tc.num_query_groups in (None, tc.num_attention_heads) and not tc.qk_layernorm
            and tc.normalization == "LayerNorm" and not tc.rotary_interleaved
            and tc.kv_channels * tc.num_attention_heads == tc.hidden_size and tc.softmax_scale is None)
    if not same:
        raise ValueError("the model's architecture no longer matches GPTNeoXForCausalLM; update sdt_dist/hf_export.py")
    return tc.layernorm_epsilon


def neox_config(model_cfg: ModelConfig, num_layers: int, eps: float, eod: int, pad: int) -> dict[str, Any]:
    """`config.json` of the GPT-NeoX equivalent of `model_cfg` with `num_layers` layers (inference: no dropout)."""
    return {
        "architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "dtype": "float32",
        "vocab_size": model_cfg.vocab_size, "hidden_size": model_cfg.hidden_size,
        "num_hidden_layers": num_layers, "num_attention_heads": model_cfg.num_attention_heads,
        "intermediate_size": model_cfg.ffn_hidden_size or 4 * model_cfg.hidden_size,
        "hidden_act": "gelu",  # exact GELU, as megatron's F.gelu
        "rope_parameters": {"rope_type": "default", "rope_theta": model_cfg.rope_base, "partial_rotary_factor": 1.0},
        "max_position_embeddings": model_cfg.seq_length, "layer_norm_eps": eps,
        "use_parallel_residual": False, "attention_bias": True, "tie_word_embeddings": model_cfg.tie_embeddings,
        "attention_dropout": 0.0, "hidden_dropout": 0.0, "initializer_range": model_cfg.init_std,
        "bos_token_id": None, "eos_token_id": eod, "pad_token_id": pad, "use_cache": True,
        "transformers_version": HF_VERSION,
    }


def model_config_from_neox(config: dict[str, Any]) -> ModelConfig:
    """Our ModelConfig for a GPT-NeoX `config.json` of this architecture (as `sdt-export-hf` writes it)."""
    rope = config.get("rope_parameters") or {}
    partial = rope.get("partial_rotary_factor", config.get("rotary_pct", 0.25))
    if config.get("use_parallel_residual", True) or partial != 1.0 or config.get("hidden_act") != "gelu" \
            or not config.get("attention_bias", True):
        raise ValueError("not a GPT-NeoX of sdt-dist's architecture (needs use_parallel_residual=false, rotary on "
                         "the whole head, hidden_act=gelu, biased attention)")
    return ModelConfig(
        num_layers=config["num_hidden_layers"], hidden_size=config["hidden_size"],
        num_attention_heads=config["num_attention_heads"], ffn_hidden_size=config["intermediate_size"],
        vocab_size=config["vocab_size"], seq_length=config["max_position_embeddings"], dropout=0.0,
        tie_embeddings=config.get("tie_word_embeddings", False),
        rope_base=rope.get("rope_theta", config.get("rotary_emb_base", 10000.0)),
        init_std=config.get("initializer_range", 0.02))


def hf_tokenizer(sp_model: Path, model_max_length: int) -> Any:
    """A transformers fast tokenizer that encodes and decodes exactly as the sentencepiece model does."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf

    from sdt_dist.data.tokenizer import Tokenizer

    proto = import_protobuf().ModelProto()
    proto.ParseFromString(Path(sp_model).read_bytes())
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, {p.piece: i for i, p in enumerate(proto.pieces)},
                                                          legacy=False)
    tok = Tokenizer(sp_model)
    piece = tok._sp.id_to_piece
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=piece(tok.eod), pad_token=piece(tok.pad),
                                   unk_token=piece(tok._sp.unk_id()), model_max_length=model_max_length)


def parse_layers(values: list[str] | None, num_layers: int) -> list[int]:
    """`--layers-to-keep 1,2,4` or `1 2 4` -> [1, 2, 4] (1-based, increasing); all layers when absent."""
    if not values:
        return list(range(1, num_layers + 1))
    try:
        keep = [int(v) for item in values for v in item.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--layers-to-keep takes layer numbers, got {' '.join(values)}") from None
    if not keep or keep != sorted(set(keep)) or keep[0] < 1 or keep[-1] > num_layers:
        raise ValueError(f"--layers-to-keep must be increasing layer numbers in 1..{num_layers}, got {keep}")
    return keep


def export_hf(source: str | Path, out: str | Path, weights: str = "student", layers_to_keep: list[str] | None = None,
              tokenizer: str | Path | None = None) -> Path:
    """Write the Hugging Face folder `out` (must not exist or be empty) from a run, checkpoint or export."""
    from transformers import GenerationConfig

    from sdt_dist.data.tokenizer import Tokenizer

    export_dir = locate_export(source)
    model_cfg = read_model_config(export_dir)
    keep = parse_layers(layers_to_keep, model_cfg.num_layers)
    eps = check_architecture(model_cfg)
    if weights not in ("student", "teacher"):
        raise ValueError(f"--weights must be student or teacher, got {weights}")
    sp_model = Path(tokenizer) if tokenizer else checkpoint_tokenizer(export_dir)
    tok = Tokenizer(sp_model)
    if tok.vocab_size > model_cfg.vocab_size:
        raise ValueError(f"{sp_model}: {tok.vocab_size} pieces, more than the model's vocab_size "
                         f"{model_cfg.vocab_size}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose another folder or remove it")
    state = to_hf_state(load_file(str(export_dir / f"{weights}.safetensors")), keep)
    if model_cfg.tie_embeddings:
        state.pop("lm_head.weight", None)  # tied: transformers shares gpt_neox.embed_in.weight
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = neox_config(model_cfg, len(keep), eps, tok.eod, tok.pad)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        GenerationConfig(bos_token_id=None, eos_token_id=tok.eod, pad_token_id=tok.pad).save_pretrained(tmp)
        hf_tokenizer(sp_model, model_cfg.seq_length).save_pretrained(tmp)
        shutil.copyfile(sp_model, tmp / SP_MODEL_NAME)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        os.chmod(tmp, 0o755)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)  # a crash leaves no half-written folder under the requested name
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Write a Hugging Face GPTNeoXForCausalLM folder (config, safetensors, tokenizer) from an "
                    "sdt-dist run, checkpoint or export, at any training layout.")
    parser.add_argument("checkpoint", help="run directory (latest checkpoint), checkpoint directory or export/")
    parser.add_argument("out", help="output folder (new or empty)")
    parser.add_argument("--weights", choices=["student", "teacher"], default="student")
    parser.add_argument("--layers-to-keep", nargs="+", metavar="N",
                        help="1-based layers to keep (e.g. 1,2,4 or 1 2 4): the pruned model")
    parser.add_argument("--tokenizer", help="sentencepiece model (default: the one the checkpoint records)")
    args = parser.parse_args(argv)
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("sdt-export-hf needs transformers: pip install 'sdt-dist[hf]'", file=sys.stderr)
        return 2
    try:
        out = export_hf(args.checkpoint, args.out, args.weights, args.layers_to_keep, args.tokenizer)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"sdt-export-hf: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} (GPTNeoXForCausalLM, {args.weights} weights); load it with "
          f"AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
