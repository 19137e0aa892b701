#!/usr/bin/env python3
"""A tiny random deepseek_v3 checkpoint, its FP8 block-quantized twin, and their transformers reference
outputs, for the parity tests.

Run where torch + transformers 5.x are installed (the GPU machine; it runs on the CPU):
    python3 scripts/make_deepseek_fixtures.py OUT_DIR        (default tests/fixtures/parity)
Writes, like scripts/make_parity_fixtures.py: config.json, model.safetensors (bf16, save_pretrained),
tokens.json (an 80-token prompt), logits.npy (fp32 [T, vocab], fp32 arithmetic over the bf16 weights),
greedy.json (10 greedy tokens), meta.json.

deepseek_v3: MLA with q_lora_rank, v_head_dim != qk_nope_head_dim, YaRN (factor 40 over an original
context of 4096, mscale = mscale_all_dim = 1, so the softmax scale carries mscale^2 = 1.874 and the
rotary frequencies are partly interpolated), interleaved rotary pairs (rope_interleave, the default),
noaux_tc routing with 4 groups of 4 experts, top-2 groups, 4 experts, a correction bias that changes the
choice, routed_scaling_factor 2.5, one shared expert, first_k_dense_replace 1.

deepseek_v3_fp8: the same model as DeepSeek publishes its weights: every Linear except the router,
embedding and lm_head in float8_e4m3fn with a weight_scale_inv per block (block [16, 32] here, so blocks
straddle matrix edges), quantization_config in config.json, an MTP layer (model.layers.3.*, beyond
num_hidden_layers) the converter must skip. Its reference: the same forward over the dequantized weights
(fp8 · scale_inv) rounded to bf16, as a bf16 cast of the checkpoint holds them.
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
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

PROMPT_LEN = 80
N_GREEDY = 10
BLOCK = (16, 32)

CONFIG = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, vocab_size=700,
              q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
              n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4, moe_intermediate_size=64,
              n_shared_experts=1, intermediate_size=96, routed_scaling_factor=2.5, first_k_dense_replace=1,
              norm_topk_prob=True, tie_word_embeddings=False, rms_norm_eps=1e-6, max_position_embeddings=163840,
              hidden_act="silu", attention_bias=False, rope_interleave=True,
              rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                               "original_max_position_embeddings": 4096, "beta_fast": 32.0, "beta_slow": 1.0,
                               "mscale": 1.0, "mscale_all_dim": 1.0})


def redraw(model, gen):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # norm weights around 1
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:  # fan_in is the last dim of [out, in] and of fused [E, out, in]
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # large enough to change which experts win
                b.copy_(0.1 * torch.randn(b.shape, generator=gen))


def reference(config, weights, tokens):
    model = DeepseekV3ForCausalLM(config).eval()
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected, unexpected
    assert all("inv_freq" in k for k in missing), missing
    return logits_and_greedy(model, tokens, N_GREEDY)


def fp8_blocks(w):
    """float8_e4m3fn weight and its [ceil(r/B0), ceil(c/B1)] fp32 scale_inv; dequantized = fp8 · scale."""
    w = w.float()
    rows, cols = w.shape
    nb0, nb1 = -(-rows // BLOCK[0]), -(-cols // BLOCK[1])
    scale = torch.zeros(nb0, nb1)
    q = torch.zeros(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(nb0):
        for j in range(nb1):
            blk = w[i * BLOCK[0]:(i + 1) * BLOCK[0], j * BLOCK[1]:(j + 1) * BLOCK[1]]
            s = blk.abs().max().clamp(min=1e-12) / 448.0
            scale[i, j] = s
            q[i * BLOCK[0]:(i + 1) * BLOCK[0], j * BLOCK[1]:(j + 1) * BLOCK[1]] = (blk / s).to(torch.float8_e4m3fn)
    return q, scale


def dequantize(q, scale):
    out = q.float()
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            out[i * BLOCK[0]:(i + 1) * BLOCK[0], j * BLOCK[1]:(j + 1) * BLOCK[1]] *= scale[i, j]
    return out


def main(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    seed = 777
    gen = torch.Generator().manual_seed(seed)
    config = DeepseekV3Config(**CONFIG)
    config._attn_implementation = "eager"
    model = DeepseekV3ForCausalLM(config).eval()
    redraw(model, gen)
    model = model.to(torch.bfloat16)
    d = os.path.join(out_dir, "deepseek_v3")
    model.save_pretrained(d, safe_serialization=True)
    saved = load_file(os.path.join(d, "model.safetensors"))
    # fp32 arithmetic over exactly the saved weights, in a fresh fp32 model (see make_parity_fixtures.py).
    weights = {k: v.float() for k, v in model.state_dict().items()}
    tokens = torch.randint(0, CONFIG["vocab_size"], (1, PROMPT_LEN), generator=gen)
    logits, greedy = reference(config, weights, tokens)
    fused = any(k.endswith("experts.gate_up_proj") for k in saved)
    meta = {"transformers": transformers.__version__, "torch": torch.__version__, "seed": seed, "prompt_len": PROMPT_LEN,
            "expert_layout_saved": "fused" if fused else "per_expert", "max_abs_logit": float(np.abs(logits).max())}
    write_outputs(d, tokens, logits, greedy, meta)
    print(f"deepseek_v3: {len(saved)} tensors ({'fused' if fused else 'per-expert'} experts), max|logit| "
          f"{np.abs(logits).max():.3f}, greedy {greedy}")
    print("   ", sorted(k for k in saved if ".layers.1." in k and ".experts." not in k))

    # The FP8 twin, from the saved checkpoint's tensors.
    d8 = os.path.join(out_dir, "deepseek_v3_fp8")
    os.makedirs(d8, exist_ok=True)
    out, deq = {}, {}
    for k, v in saved.items():
        quantize = v.dim() == 2 and k.endswith(".weight") and "embed_tokens" not in k and "lm_head" not in k \
            and not k.endswith("mlp.gate.weight")
        if quantize:
            q, s = fp8_blocks(v)
            out[k] = q
            out[k + "_scale_inv"] = s
            deq[k] = dequantize(q, s).to(torch.bfloat16)
        else:
            out[k] = v
            deq[k] = v
    # The multi-token-prediction layer the published checkpoints carry after the last layer.
    out["model.layers.3.eh_proj.weight"] = torch.randn(64, 128, generator=gen).to(torch.bfloat16)
    out["model.layers.3.enorm.weight"] = torch.ones(64, dtype=torch.bfloat16)
    out["model.layers.3.self_attn.q_a_proj.weight"], out["model.layers.3.self_attn.q_a_proj.weight_scale_inv"] = \
        fp8_blocks(torch.randn(32, 64, generator=gen))
    save_file(out, os.path.join(d8, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": list(BLOCK)}
    with open(os.path.join(d8, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    # Names as the model's state dict has them (save_pretrained may have renamed experts).
    state_names = set(model.state_dict().keys())
    if set(deq.keys()) != state_names:
        # per-expert files vs fused state: rebuild the fused tensors from the dequantized per-expert ones.
        n_e, inter = CONFIG["n_routed_experts"], CONFIG["moe_intermediate_size"]
        for name in state_names - set(deq.keys()):
            prefix = name.rsplit(".", 1)[0]
            if name.endswith("gate_up_proj"):
                deq[name] = torch.stack([torch.cat([deq[f"{prefix}.{e}.gate_proj.weight"], deq[f"{prefix}.{e}.up_proj.weight"]], 0)
                                         for e in range(n_e)])
            elif name.endswith("down_proj"):
                deq[name] = torch.stack([deq[f"{prefix}.{e}.down_proj.weight"] for e in range(n_e)])
        deq = {k: v for k, v in deq.items() if k in state_names}
    logits8, greedy8 = reference(config, {k: v.float() for k, v in deq.items()}, tokens)
    meta8 = dict(meta, block=list(BLOCK), reference="fp8 * scale_inv rounded to bf16", max_abs_logit=float(np.abs(logits8).max()))
    write_outputs(d8, tokens, logits8, greedy8, meta8)
    print(f"deepseek_v3_fp8: {len(out)} tensors, max |logit - bf16 logit| {np.abs(logits8 - logits).max():.4f}, greedy {greedy8}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/parity")
