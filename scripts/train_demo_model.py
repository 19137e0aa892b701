#!/usr/bin/env python3
"""Trains moeflux's bundled demo model: a small qwen3_moe on Debian's fortune cookies.

Run where torch, transformers 5.x and tokenizers are installed (the GPU machine):
    scripts/prepare_demo_corpus.sh corpus.txt            # on a Debian machine: the training text
    python3 scripts/train_demo_model.py --corpus corpus.txt --out models/demo
Writes config.json, model.safetensors (bf16), tokenizer.json, tokenizer_config.json (with the chat
template) and training.json (settings, loss curve, held-out perplexity) to --out.

The tokenizer is a byte-level BPE trained with `tokenizers` using Qwen3's pre-tokenizer pattern and NFC,
with <|endoftext|>, <|im_start|> and <|im_end|> as special tokens. A third of the fortunes are wrapped as
chat turns ("Tell me a fortune about <topic>.") so `moeflux chat` has something to answer with.
"""
import argparse
import json
import math
import os
import random
import time

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen3MoeConfig, Qwen3MoeForCausalLM

QWEN3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def read_fortunes(path):
    docs = []
    for block in open(path, encoding="utf-8", errors="replace").read().split("\n%\n"):
        lines = block.strip("\n").split("\n")
        if not lines or not lines[0].startswith("#topic "):
            continue
        topic, text = lines[0][len("#topic "):], "\n".join(lines[1:]).strip("\n")
        if text.strip():
            docs.append((topic, text))
    return docs


def render(topic, text, rng):
    if rng.random() < 1 / 3:
        return (f"<|im_start|>user\nTell me a fortune about {topic}.<|im_end|>\n"
                f"<|im_start|>assistant\n{text}<|im_end|>\n")
    return text + "\n<|endoftext|>"


def train_tokenizer(texts, vocab_size):
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def quick_held_out_loss(model, held, seq):
    """Mean next-token loss over non-overlapping windows (bf16 autocast: a cheap guide for step choice)."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad(), torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=held.is_cuda):
        for s in range(0, len(held) - seq - 1, seq):
            x = held[s:s + seq + 1][None]
            logits = model(input_ids=x[:, :-1], use_cache=False).logits.float()
            total += torch.nn.functional.cross_entropy(logits[0], x[0, 1:], reduction="sum").item()
            count += seq
    model.train()
    return total / count


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    dev = "cuda" if torch.cuda.is_available() else "cpu"

    docs = read_fortunes(args.corpus)
    rng.shuffle(docs)
    n_held = len(docs) // 20  # 5% held out, never seen by the tokenizer or the model
    held, train = docs[:n_held], docs[n_held:]
    train_texts = [render(t, x, rng) for t, x in train]
    held_texts = [render(t, x, rng) for t, x in held]

    tok = train_tokenizer(train_texts, args.vocab)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token=None, bos_token=None, model_max_length=2048)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(args.out)
    # The issue asks for the template inside tokenizer_config.json; transformers 5 may write it apart.
    cfg_path = os.path.join(args.out, "tokenizer_config.json")
    cfg = json.load(open(cfg_path))
    cfg["chat_template"] = CHAT_TEMPLATE
    json.dump(cfg, open(cfg_path, "w"), indent=2, ensure_ascii=False)
    for extra in ("chat_template.jinja", "special_tokens_map.json"):
        p = os.path.join(args.out, extra)
        if os.path.exists(p):
            os.remove(p)

    def encode(texts):
        ids = []
        for t in texts:
            ids.extend(tok.encode(t).ids)
        return torch.tensor(ids, dtype=torch.long)

    train_ids, held_ids = encode(train_texts), encode(held_texts)
    print(f"docs {len(train)} train / {len(held)} held out; tokens {len(train_ids)} / {len(held_ids)}; "
          f"vocab {tok.get_vocab_size()}", flush=True)

    eos = tok.token_to_id("<|im_end|>")
    config = Qwen3MoeConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, num_experts=16, num_experts_per_tok=4, moe_intermediate_size=192,
        intermediate_size=512, norm_topk_prob=True, max_position_embeddings=2048, rms_norm_eps=1e-6,
        tie_word_embeddings=False, output_router_logits=True, router_aux_loss_coef=0.01,
        bos_token_id=None, eos_token_id=eos, pad_token_id=tok.token_to_id("<|endoftext|>"),
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    model = Qwen3MoeForCausalLM(config).to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters {n_params / 1e6:.2f} M", flush=True)

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, args.steps // 20)

    def lr_at(step):
        if step < warmup:
            return args.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    train_dev = train_ids.to(dev)
    held_dev = held_ids.to(dev)
    best = (float("inf"), -1, None)
    curve = []
    start = time.time()
    model.train()
    for step in range(args.steps):
        starts = torch.randint(0, len(train_dev) - args.seq - 1, (args.batch,), device=dev)
        x = torch.stack([train_dev[s:s + args.seq + 1] for s in starts.tolist()])
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=dev == "cuda"):
            out = model(input_ids=x[:, :-1], use_cache=False)
            logits = out.logits.float()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
            if getattr(out, "aux_loss", None) is not None:
                loss = loss + config.router_aux_loss_coef * out.aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % args.eval_every == 0 or step == args.steps - 1:
            # The corpus is small (under a million tokens): the held-out loss picks the step to keep,
            # before the model starts memorizing fortunes.
            held_loss = quick_held_out_loss(model, held_dev, args.seq)
            curve.append([step, round(loss.item(), 4), round(held_loss, 4)])
            if held_loss < best[0]:
                best = (held_loss, step, {k: v.detach().clone() for k, v in model.state_dict().items()})
            print(f"step {step} loss {loss.item():.3f} held-out {held_loss:.3f} lr {lr_at(step):.2e} "
                  f"{time.time() - start:.0f}s", flush=True)
    train_seconds = time.time() - start
    model.load_state_dict(best[2])
    print(f"keeping step {best[1]} (held-out loss {best[0]:.3f})", flush=True)

    # Save in bf16; measure held-out perplexity of exactly those weights computed in fp32 (what a bf16
    # moeflux pack computes), over non-overlapping windows of the held-out token stream.
    model = model.to(torch.bfloat16)
    model.config.output_router_logits = False
    model.save_pretrained(args.out, safe_serialization=True)
    weights = {k: v.float() for k, v in model.state_dict().items()}
    ref = Qwen3MoeForCausalLM(model.config).to(dev).eval()
    ref.load_state_dict(weights, strict=True)
    nll, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(held_ids) - args.seq - 1, args.seq):
            x = held_ids[s:s + args.seq + 1].to(dev)[None]
            logits = ref(input_ids=x[:, :-1], use_cache=False).logits.float()
            nll += torch.nn.functional.cross_entropy(logits[0], x[0, 1:], reduction="sum").item()
            count += args.seq
    ppl = math.exp(nll / count)
    info = {"steps": args.steps, "kept_step": best[1], "batch": args.batch, "seq": args.seq, "lr": args.lr, "seed": args.seed,
            "parameters": n_params, "train_tokens": len(train_ids), "held_out_tokens": len(held_ids),
            "held_out_perplexity_fp32_over_bf16_weights": round(ppl, 3), "held_out_windows": args.seq,
            "train_seconds": round(train_seconds, 1), "loss_curve": curve,
            "torch": torch.__version__, "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu"}
    import transformers
    info["transformers"] = transformers.__version__
    json.dump(info, open(os.path.join(args.out, "training.json"), "w"), indent=1)
    # A sample, so the log shows the model writes text.
    prompt = "<|im_start|>user\nTell me a fortune about computers.<|im_end|>\n<|im_start|>assistant\n"
    ids = torch.tensor([tok.encode(prompt).ids], device=dev)
    with torch.no_grad():
        for _ in range(60):
            nxt = int(ref(input_ids=ids, use_cache=False).logits[0, -1].argmax())
            ids = torch.cat([ids, torch.tensor([[nxt]], device=dev)], 1)
            if nxt == eos:
                break
    print("sample:", tok.decode(ids[0].tolist(), skip_special_tokens=False), flush=True)
    print(f"held-out perplexity {ppl:.3f} over {count} tokens; trained {train_seconds:.0f}s", flush=True)


if __name__ == "__main__":
    main()
