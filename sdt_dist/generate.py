"""Text generation from an sdt-dist model (`sdt-generate`): temperature, top-k and top-p sampling with a KV cache.

Reads a run, checkpoint or export (sdt-dist names), or a folder `sdt-export-hf` wrote (GPT-NeoX names); needs
neither transformers nor torch.distributed. Why not `GPTModel`: megatron-core keeps its KV cache inside its
inference engine (an inference context threaded through every layer, built for CUDA), which the training model
does not use; at TP = 1 the same decoder is a few lines of torch over the exported weights. The tests check its
logits against `GPTModel` and the cached path against the uncached one.

The prompt is preceded by the end-of-document token, as every document but the first is in training.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from sdt_dist.config import ModelConfig
from sdt_dist.export import checkpoint_tokenizer, locate_export, read_model_config

KVCache = list[tuple[torch.Tensor, torch.Tensor]]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # rotated halves (megatron's rotary_interleaved=False)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class CachedDecoder:
    """The GPT decoder over a full (TP = 1) state dict under `GPTModel` names, in eval mode (no dropout)."""

    def __init__(self, state: dict[str, torch.Tensor], cfg: ModelConfig, eps: float) -> None:
        self.w = {k: v.float() for k, v in state.items()}
        self.cfg, self.eps = cfg, eps
        self.heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // self.heads
        self.num_layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("layers."))
        self.inv_freq = 1.0 / (cfg.rope_base ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32)
                                                 / self.head_dim))

    def _norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.w[f"{name}.weight"], self.w[f"{name}.bias"], self.eps)

    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, self.w[f"{name}.weight"], self.w.get(f"{name}.bias"))

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, cache: KVCache | None = None) -> tuple[torch.Tensor, KVCache]:
        """[b, s] tokens following the `cache` (the keys and values of the earlier positions) ->
        [b, s, vocab] logits and the cache extended by these positions."""
        b, s = tokens.shape
        start = 0 if not cache else cache[0][0].size(2)
        angles = torch.outer(torch.arange(start, start + s, dtype=torch.float32), self.inv_freq)
        angles = torch.cat((angles, angles), dim=-1)
        cos, sin = angles.cos(), angles.sin()
        # query i (position start + i) sees keys 0 .. start + i
        mask = torch.ones(s, start + s, dtype=torch.bool).tril(diagonal=start)
        h = F.embedding(tokens, self.w["embedding.weight"])
        new_cache: KVCache = []
        for i in range(self.num_layers):
            p = f"layers.{i}"
            qkv = self._linear(self._norm(h, f"{p}.input_layernorm"), f"{p}.self_attention.linear_qkv")
            q, k, v = qkv.view(b, s, self.heads, 3 * self.head_dim).transpose(1, 2).chunk(3, dim=-1)
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
            if cache:
                k, v = torch.cat((cache[i][0], k), dim=2), torch.cat((cache[i][1], v), dim=2)
            new_cache.append((k, v))
            attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            h = h + self._linear(attn.transpose(1, 2).reshape(b, s, -1), f"{p}.self_attention.linear_proj")
            x = F.gelu(self._linear(self._norm(h, f"{p}.pre_mlp_layernorm"), f"{p}.mlp.linear_fc1"))
            h = h + self._linear(x, f"{p}.mlp.linear_fc2")
        head = self.w["embedding.weight" if self.cfg.tie_embeddings else "output_layer.weight"]
        return F.linear(self._norm(h, "final_norm"), head), new_cache


def next_token(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float,
               generator: torch.Generator) -> int:
    """Sample from [vocab] logits: argmax at temperature 0, else softmax(logits / T) cut to the `top_k` most
    likely tokens and to the smallest set whose probability reaches `top_p`."""
    if temperature == 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k:
        logits = logits.masked_fill(logits < torch.topk(logits, min(top_k, logits.numel())).values[-1], -torch.inf)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        before = sorted_logits.softmax(-1).cumsum(-1) - sorted_logits.softmax(-1)  # mass of the more likely ones
        logits = logits.masked_fill(torch.zeros_like(logits, dtype=torch.bool).scatter(0, order, before >= top_p),
                                    -torch.inf)
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))


def generate(decoder: CachedDecoder, prompt: list[int], max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float = 1.0, seed: int = 0, eod: int | None = None,
             vocab_limit: int | None = None) -> list[int]:
    """New tokens after `prompt` (stops after `max_new_tokens` or at `eod`, which is not returned). Ids at or
    above `vocab_limit` (embedding rows the tokenizer has no piece for) are never chosen."""
    if not prompt:
        raise ValueError("the prompt must hold at least one token")
    generator = torch.Generator().manual_seed(seed)
    logits, cache = decoder(torch.tensor([prompt]))
    out: list[int] = []
    for _ in range(max_new_tokens):
        last = logits[0, -1]
        if vocab_limit is not None and vocab_limit < last.numel():
            last = last.clone()
            last[vocab_limit:] = -torch.inf
        token = next_token(last, temperature, top_k, top_p, generator)
        if token == eod:
            break
        out.append(token)
        logits, cache = decoder(torch.tensor([[token]]), cache)
    return out


def load_decoder(path: str | Path, weights: str = "student",
                 tokenizer: str | Path | None = None) -> tuple[CachedDecoder, Path]:
    """The decoder and sentencepiece model of a run, checkpoint, export or `sdt-export-hf` folder."""
    from sdt_dist.hf_export import SP_MODEL_NAME, check_architecture, from_hf_state, model_config_from_neox

    path = Path(path)
    hf_config = path / "config.json"
    if hf_config.is_file() and (path / "model.safetensors").is_file():
        config = json.loads(hf_config.read_text())
        cfg = model_config_from_neox(config)
        state = from_hf_state(load_file(str(path / "model.safetensors")))
        sp_model = Path(tokenizer) if tokenizer else path / SP_MODEL_NAME
        return CachedDecoder(state, cfg, config["layer_norm_eps"]), sp_model
    export_dir = locate_export(path)
    cfg = read_model_config(export_dir)
    state = load_file(str(export_dir / f"{weights}.safetensors"))
    sp_model = Path(tokenizer) if tokenizer else checkpoint_tokenizer(export_dir)
    return CachedDecoder(state, cfg, check_architecture(cfg)), sp_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Sample text from an sdt-dist model (KV cache, CPU or GPU-free).")
    parser.add_argument("checkpoint", help="run directory, checkpoint, export/ or a folder sdt-export-hf wrote")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=1.0, help="0: greedy (argmax)")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weights", choices=["student", "teacher"], default="student")
    parser.add_argument("--tokenizer", help="sentencepiece model (default: the checkpoint's / the folder's)")
    args = parser.parse_args(argv)
    if args.temperature < 0 or not 0 < args.top_p <= 1 or (args.top_k is not None and args.top_k < 1) \
            or args.max_new_tokens < 0:
        print("sdt-generate: need --temperature >= 0, 0 < --top-p <= 1, --top-k >= 1, --max-new-tokens >= 0",
              file=sys.stderr)
        return 2
    from sdt_dist.data.errors import DataError
    from sdt_dist.data.tokenizer import Tokenizer

    try:
        decoder, sp_model = load_decoder(args.checkpoint, args.weights, args.tokenizer)
        tok = Tokenizer(sp_model)
    except (FileNotFoundError, ValueError, DataError) as e:
        print(f"sdt-generate: {e}", file=sys.stderr)
        return 2
    new = generate(decoder, [tok.eod] + tok.encode(args.prompt), args.max_new_tokens, args.temperature, args.top_k,
                   args.top_p, args.seed, tok.eod, tok.vocab_size)
    print(args.prompt + tok.decode(new))
    return 0


if __name__ == "__main__":
    sys.exit(main())
