#!/usr/bin/env python3
"""Tiny random qwen3_moe checkpoints and their transformers reference outputs, for the parity tests.

Run where torch + transformers 5.x are installed (the GPU machine; it runs on the CPU):
    python3 scripts/make_parity_fixtures.py OUT_DIR
Each fixture directory gets: config.json + model.safetensors (bf16, save_pretrained), tokens.json (the
prompt), logits.npy (fp32 [T, vocab]: logits at every prompt position, computed in fp32 over the bf16
weights), greedy.json (10 greedy continuation tokens, fp32) and meta.json (versions, seeds).
The weights are re-drawn at a scale (1/sqrt(fan_in)) that makes routing and the next token decisive, so
a correct implementation cannot land on the other side of a near-tie.
"""
import json
import math
import os
import sys

import numpy as np
import torch
import transformers
from safetensors.torch import load_file, save_file

from fixture_io import logits_and_greedy, write_outputs
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

PROMPT_LEN = 32
N_GREEDY = 10

FIXTURES = {
    # tied embeddings, a dense mlp_only layer, norm_topk_prob true, GQA 4:2, head_dim 24 != 64/4,
    # vocab 1000 (not a multiple of 64)
    "tied_dense_gqa": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=24, vocab_size=1000, num_experts=8, num_experts_per_tok=2,
                           moe_intermediate_size=64, intermediate_size=128, mlp_only_layers=[1],
                           norm_topk_prob=True, tie_word_embeddings=True, decoder_sparse_step=1),
    # untied, norm_topk_prob false, decoder_sparse_step 2 (layers 0 and 2 dense), GQA 8:2, head_dim 16,
    # vocab 997 (prime), top-3 of 6 experts
    "untied_sparse_step": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                               head_dim=16, vocab_size=997, num_experts=6, num_experts_per_tok=3,
                               moe_intermediate_size=64, intermediate_size=96, mlp_only_layers=[],
                               norm_topk_prob=False, tie_word_embeddings=False, decoder_sparse_step=2),
    # wider: hidden 128, MHA (no GQA), 16 experts top-4, every layer MoE
    "wide_mha": dict(hidden_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                     head_dim=32, vocab_size=1500, num_experts=16, num_experts_per_tok=4,
                     moe_intermediate_size=64, intermediate_size=256, mlp_only_layers=[],
                     norm_topk_prob=True, tie_word_embeddings=False, decoder_sparse_step=1),
}


def make_config(spec):
    kwargs = dict(spec, rms_norm_eps=1e-6, max_position_embeddings=4096, hidden_act="silu",
                  attention_bias=False, use_sliding_window=False)
    try:
        return Qwen3MoeConfig(**kwargs, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    except TypeError:
        return Qwen3MoeConfig(**kwargs, rope_theta=10000.0)


def redraw(model, gen):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # norm weights around 1
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif "embed_tokens" in name:
                # Tied: the embedding is also the output head, so it gets the head's scale (logits ~ N(0, 1)).
                scale = 1.0 / math.sqrt(p.shape[-1]) if model.config.tie_word_embeddings else 1.0
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
            else:  # fan_in is the last dim of [out, in] and of fused [E, out, in]
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))


def main(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    for index, (name, spec) in enumerate(FIXTURES.items()):
        seed = 1234 + index
        gen = torch.Generator().manual_seed(seed)
        config = make_config(spec)
        config._attn_implementation = "eager"
        model = Qwen3MoeForCausalLM(config).eval()
        redraw(model, gen)
        model = model.to(torch.bfloat16)
        d = os.path.join(out_dir, name)
        model.save_pretrained(d, safe_serialization=True)
        # The reference: fp32 arithmetic over exactly the bf16 weights that were saved. A fresh fp32
        # model takes the weights: casting the bf16 model back with .to() would keep its rotary inv_freq
        # buffer rounded to bf16, which transformers never does when it loads a bf16 checkpoint.
        weights = {k: v.float() for k, v in model.state_dict().items()}
        model = Qwen3MoeForCausalLM(config).eval()
        model.load_state_dict(weights, strict=True)
        tokens = torch.randint(0, spec["vocab_size"], (1, PROMPT_LEN), generator=gen)
        logits, greedy = logits_and_greedy(model, tokens, N_GREEDY)
        keys = sorted(load_file(os.path.join(d, "model.safetensors")).keys())
        fused = any(k.endswith("experts.gate_up_proj") for k in keys)
        write_outputs(d, tokens, logits, greedy,
                      {"transformers": transformers.__version__, "torch": torch.__version__, "seed": seed,
                       "prompt_len": PROMPT_LEN, "expert_layout_saved": "fused" if fused else "per_expert",
                       "max_abs_logit": float(np.abs(logits).max())})
        print(f"{name}: {len(keys)} tensors, experts saved {'fused' if fused else 'per-expert'}, "
              f"max|logit| {np.abs(logits).max():.3f}, greedy {greedy}")

        # The same weights in the other expert layout, so both checkpoint styles are covered by real files.
        if name == "tied_dense_gqa":
            alt = os.path.join(out_dir, name + "_other_layout")
            os.makedirs(alt, exist_ok=True)
            tensors = load_file(os.path.join(d, "model.safetensors"))
            out = {}
            n_e, inter = spec["num_experts"], spec["moe_intermediate_size"]
            for k, v in tensors.items():
                if fused and k.endswith("experts.gate_up_proj"):
                    prefix = k[: -len(".gate_up_proj")]
                    for e in range(n_e):
                        out[f"{prefix}.{e}.gate_proj.weight"] = v[e, :inter].contiguous()
                        out[f"{prefix}.{e}.up_proj.weight"] = v[e, inter:].contiguous()
                elif fused and k.endswith("experts.down_proj"):
                    prefix = k[: -len(".down_proj")]
                    for e in range(n_e):
                        out[f"{prefix}.{e}.down_proj.weight"] = v[e].contiguous()
                elif not fused and ".experts." in k:
                    continue
                else:
                    out[k] = v
            if not fused:
                layers = sorted({k.split(".experts.")[0] for k in keys if ".experts." in k})
                for prefix in layers:
                    gu = [torch.cat([tensors[f"{prefix}.experts.{e}.gate_proj.weight"],
                                     tensors[f"{prefix}.experts.{e}.up_proj.weight"]], 0) for e in range(n_e)]
                    out[f"{prefix}.experts.gate_up_proj"] = torch.stack(gu).contiguous()
                    out[f"{prefix}.experts.down_proj"] = torch.stack(
                        [tensors[f"{prefix}.experts.{e}.down_proj.weight"] for e in range(n_e)]).contiguous()
            save_file(out, os.path.join(alt, "model.safetensors"), metadata={"format": "pt"})
            with open(os.path.join(d, "config.json")) as f:
                cfg = f.read()
            with open(os.path.join(alt, "config.json"), "w") as f:
                f.write(cfg)
            print(f"{name}_other_layout: {len(out)} tensors, experts {'per-expert' if fused else 'fused'}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/parity")
