#!/usr/bin/env python3
"""Tiny random hybrid Gated DeltaNet checkpoints (qwen3_next, qwen3_5_moe_text) and their transformers
reference outputs, for the parity tests.

Run where torch + transformers >= 5.2 are installed (the GPU machine; it runs on the CPU):
    python3 scripts/make_hybrid_fixtures.py OUT_DIR        (default tests/fixtures/parity)
Each fixture directory gets what scripts/make_parity_fixtures.py writes: config.json +
model.safetensors (bf16, save_pretrained), tokens.json (a 160-token prompt: the DeltaNet's chunked
prefill crosses its 64-token chunk boundaries and ends in a partial chunk), logits.npy (fp32 [T, vocab],
fp32 arithmetic over the bf16 weights), greedy.json (10 greedy tokens) and meta.json.
Also qwen3_5_moe_multimodal: the qwen3_5 fixture's weights in the published multimodal layout
(config "qwen3_5_moe" with text_config, tensors under model.language_model., experts fused as
experts.gate_up_proj [E, 2I, H] / experts.down_proj [E, H, I] without ".weight", plus vision-tower and
mtp.* tensors the converter must skip); its reference outputs are the qwen3_5 fixture's. (transformers
saves its own checkpoints per-expert, so the fused layout is built here.)

The fixtures cover linear and full attention layers mixed, GQA, more value heads than key heads (2× and
3×), key head dim != value head dim, head_dim != hidden / heads, partial rotary, a dense mlp_only layer
(qwen3_next), shared experts, and decays that keep memory across chunks (A_log, dt_bias redrawn).
Expert matrices have 64 columns or a multiple, so every pack format (q4 groups of 64) applies.
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

PROMPT_LEN = 160
N_GREEDY = 10

FIXTURES = {
    # qwen3_next: its grouped in_proj_qkvz / in_proj_ba layout; 3 value heads per key head; dk 12 != dv 16;
    # head_dim 32 != 64/4; rotary on 8 of 32 dims; layer 1 a dense MLP; layers 3 full attention.
    "qwen3_next": dict(
        model_type="qwen3_next",
        config=dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                    vocab_size=600, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64,
                    shared_expert_intermediate_size=48, intermediate_size=96, mlp_only_layers=[1],
                    decoder_sparse_step=1, norm_topk_prob=True, tie_word_embeddings=False,
                    linear_conv_kernel_dim=4, linear_key_head_dim=12, linear_value_head_dim=16,
                    linear_num_key_heads=2, linear_num_value_heads=6,
                    layer_types=["linear_attention", "linear_attention", "full_attention", "linear_attention"],
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}),
    ),
    # qwen3_5_moe_text: the flat in_proj_qkv / z / b / a layout, fused experts; 2 value heads per key head;
    # dk 16 != dv 8; head_dim 24 != 64/4; rotary on 6 of 24 dims (M-RoPE sections, text positions).
    "qwen3_5": dict(
        model_type="qwen3_5_moe_text",
        config=dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                    vocab_size=500, num_experts=8, num_experts_per_tok=3, moe_intermediate_size=64,
                    shared_expert_intermediate_size=40, tie_word_embeddings=False,
                    linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=8,
                    linear_num_key_heads=2, linear_num_value_heads=4,
                    layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
                    rope_parameters={"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25,
                                     "mrope_section": [1, 1, 1], "mrope_interleaved": True}),
    ),
}


def model_classes(model_type):
    if model_type == "qwen3_next":
        return transformers.Qwen3NextConfig, transformers.Qwen3NextForCausalLM
    return transformers.Qwen3_5MoeTextConfig, transformers.Qwen3_5MoeForCausalLM


def redraw(model, gen):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                # Decay rates that keep a memory over tens of tokens (exp(g) mostly 0.5–0.99), so state
                # carried across chunk boundaries matters to the logits.
                p.copy_(torch.log(0.05 + 0.45 * torch.rand(p.shape, generator=gen)))
            elif name.endswith("dt_bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            elif name.endswith("linear_attn.norm.weight"):  # the gated norm: a plain multiplier
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif p.dim() == 1:  # zero-centred (1 + w) norms: offsets around 0
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:  # fan_in is the last dim of [out, in], of fused [E, out, in] and of conv1d [C, 1, K]
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))


def reference(config_cls, model_cls, cfg, weights, tokens):
    config = config_cls(**cfg)
    config._attn_implementation = "eager"
    model = model_cls(config).eval()
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return logits_and_greedy(model, tokens, N_GREEDY)


def multimodal_variant(out_dir, src_dir, gen):
    """The qwen3_5 fixture in the published Qwen3.5 layout: a qwen3_5_moe config wrapping text_config,
    the text tower under model.language_model., and tensors the CausalLM ignores (vision, mtp)."""
    d = os.path.join(out_dir, "qwen3_5_moe_multimodal")
    os.makedirs(d, exist_ok=True)
    tensors = load_file(os.path.join(src_dir, "model.safetensors"))
    with open(os.path.join(src_dir, "config.json")) as f:
        text = json.load(f)
    n_e, inter = text["num_experts"], text["moe_intermediate_size"]
    out = {}
    for k, v in tensors.items():
        if ".mlp.experts." in k:
            continue  # fused below, as the published checkpoints store them
        out["model.language_model." + k[len("model."):] if k.startswith("model.") else k] = v
    for prefix in sorted({k.split(".experts.")[0] for k in tensors if ".mlp.experts." in k}):
        new_prefix = "model.language_model." + prefix[len("model."):] + ".experts"
        out[new_prefix + ".gate_up_proj"] = torch.stack(
            [torch.cat([tensors[f"{prefix}.experts.{e}.gate_proj.weight"], tensors[f"{prefix}.experts.{e}.up_proj.weight"]], 0)
             for e in range(n_e)]).contiguous()
        out[new_prefix + ".down_proj"] = torch.stack(
            [tensors[f"{prefix}.experts.{e}.down_proj.weight"] for e in range(n_e)]).contiguous()
        assert out[new_prefix + ".gate_up_proj"].shape == (n_e, 2 * inter, text["hidden_size"])
    out["model.visual.patch_embed.proj.weight"] = torch.randn(16, 3, 2, 4, 4, generator=gen).to(torch.bfloat16)
    out["model.visual.blocks.0.attn.qkv.weight"] = torch.randn(48, 16, generator=gen).to(torch.bfloat16)
    out["mtp.fc.weight"] = torch.randn(64, 128, generator=gen).to(torch.bfloat16)
    out["mtp.layers.0.mlp.experts.gate_up_proj"] = torch.randn(8, 64, 64, generator=gen).to(torch.bfloat16)
    save_file(out, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    config = {"architectures": ["Qwen3_5MoeForConditionalGeneration"], "model_type": "qwen3_5_moe",
              "text_config": text, "vision_config": {"model_type": "qwen3_5_moe_vision", "depth": 1, "hidden_size": 16},
              "tie_word_embeddings": False, "transformers_version": transformers.__version__}
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    print(f"qwen3_5_moe_multimodal: {len(out)} tensors")


def main(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    from transformers.models.qwen3_next import modeling_qwen3_next
    fast = getattr(modeling_qwen3_next, "is_fast_path_available", None)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, DeltaNet fast path: {fast}")
    for index, (name, spec) in enumerate(FIXTURES.items()):
        seed = 4321 + index
        gen = torch.Generator().manual_seed(seed)
        config_cls, model_cls = model_classes(spec["model_type"])
        cfg = dict(spec["config"], rms_norm_eps=1e-6, max_position_embeddings=4096, hidden_act="silu", attention_bias=False)
        config = config_cls(**cfg)
        model = model_cls(config).eval()
        redraw(model, gen)
        model = model.to(torch.bfloat16)
        d = os.path.join(out_dir, name)
        model.save_pretrained(d, safe_serialization=True)
        # fp32 arithmetic over exactly the saved bf16 weights, in a fresh fp32 model (see
        # make_parity_fixtures.py: .to() would leave the rotary inv_freq rounded to bf16).
        weights = {k: v.float() for k, v in model.state_dict().items()}
        tokens = torch.randint(0, cfg["vocab_size"], (1, PROMPT_LEN), generator=gen)
        logits, greedy = reference(config_cls, model_cls, cfg, weights, tokens)
        keys = sorted(load_file(os.path.join(d, "model.safetensors")).keys())
        fused = any(k.endswith("experts.gate_up_proj") for k in keys)
        meta = {"transformers": transformers.__version__, "torch": torch.__version__, "seed": seed,
                "prompt_len": PROMPT_LEN, "expert_layout_saved": "fused" if fused else "per_expert",
                "deltanet_fast_path": bool(fast), "max_abs_logit": float(np.abs(logits).max())}
        write_outputs(d, tokens, logits, greedy, meta)
        print(f"{name}: {len(keys)} tensors, experts saved {'fused' if fused else 'per-expert'}, "
              f"max|logit| {np.abs(logits).max():.3f}, greedy {greedy}")
        print("   ", [k for k in keys if ".layers.0." in k or "layers" not in k])
        if name == "qwen3_5":
            multimodal_variant(out_dir, d, gen)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/parity")
