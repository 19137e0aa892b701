#!/usr/bin/env python3
"""Reference ids for the tokenizer tests, from Hugging Face `tokenizers` (the reference).

Usage: scripts/make_tokenizer_fixtures.py TOKENIZERS_DIR [OUT_DIR]
  TOKENIZERS_DIR holds qwen3/ and deepseek_v3/, each with tokenizer.json and tokenizer_config.json
  (scripts/fetch-tokenizers.sh TOKENIZERS_DIR puts them there).
  OUT_DIR defaults to tests/fixtures/tokenizer/ next to this script's repository.

Reads the test strings from tests/fixtures/tokenizer/strings.json and writes OUT_DIR/<model>.json:
  {"model": ..., "tokenizers_version": ..., "add_special": {...}, "cases": [
     {"name", "text", "ids", "ids_add_special", "decoded", "decoded_skip_special"}]}
  ids              = Tokenizer.encode(text, add_special_tokens=False).ids
  ids_add_special  = Tokenizer.encode(text, add_special_tokens=True).ids, with the post-processor
                     transformers installs: when tokenizer_config.json has add_bos_token /
                     add_eos_token, LlamaTokenizerFast.update_post_processor replaces tokenizer.json's
                     post_processor with TemplateProcessing "[bos] $A [eos]" (DeepSeek-V3 gets its
                     BOS this way; its tokenizer.json post_processor is ByteLevel, which adds none).
                     The ids still come from `tokenizers`: this script only sets that processor.
  decoded          = Tokenizer.decode(ids_add_special, skip_special_tokens=False)
  decoded_skip_special = Tokenizer.decode(ids_add_special, skip_special_tokens=True)
Needs: pip install tokenizers (transformers optional: when present, ids_add_special is
cross-checked against AutoTokenizer and a mismatch is reported, not hidden).
"""
import json
import os
import sys

from tokenizers import Tokenizer, __version__ as tokenizers_version
from tokenizers.processors import TemplateProcessing

MODELS = ["qwen3", "deepseek_v3"]


def config_token(config, key):
    value = config.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def install_transformers_post_processor(tok, config):
    """Mirrors transformers' LlamaTokenizerFast.update_post_processor. Returns what it did."""
    has_bos_flag = isinstance(config.get("add_bos_token"), bool)
    has_eos_flag = isinstance(config.get("add_eos_token"), bool)
    if not (has_bos_flag or has_eos_flag):
        return {"source": "tokenizer.json post_processor"}
    bos = config_token(config, "bos_token")
    eos = config_token(config, "eos_token")
    add_bos = bool(config.get("add_bos_token")) and bos is not None
    add_eos = bool(config.get("add_eos_token")) and eos is not None
    single = (f"{bos}:0 " if add_bos else "") + "$A:0" + (f" {eos}:0" if add_eos else "")
    pair = single + (f" {bos}:1" if add_bos else "") + " $B:1" + (f" {eos}:1" if add_eos else "")
    special_tokens = []
    if add_bos:
        special_tokens.append((bos, tok.token_to_id(bos)))
    if add_eos:
        special_tokens.append((eos, tok.token_to_id(eos)))
    tok.post_processor = TemplateProcessing(single=single, pair=pair, special_tokens=special_tokens)
    return {"source": "tokenizer_config.json add_bos_token/add_eos_token", "single": single}


def cross_check_transformers(model_dir, cases):
    try:
        from transformers import AutoTokenizer
    except ImportError:
        print("  transformers not installed: no cross-check of ids_add_special")
        return
    try:
        hf = AutoTokenizer.from_pretrained(model_dir)
    except Exception as e:  # noqa: BLE001 - report and go on, the tokenizers ids are the fixture
        print(f"  transformers could not load {model_dir}: {e}")
        return
    for case in cases:
        ids = hf(case["text"], add_special_tokens=True)["input_ids"]
        if ids != case["ids_add_special"]:
            print(f"  WARNING {case['name']}: transformers gives {ids[:8]}..., tokenizers {case['ids_add_special'][:8]}...")


def main():
    if len(sys.argv) not in (2, 3):
        print(__doc__)
        sys.exit(2)
    tokenizers_dir = sys.argv[1]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out_dir = sys.argv[2] if len(sys.argv) == 3 else os.path.join(repo, "tests", "fixtures", "tokenizer")
    with open(os.path.join(repo, "tests", "fixtures", "tokenizer", "strings.json"), encoding="utf-8") as f:
        strings = json.load(f)["strings"]

    for model in MODELS:
        model_dir = os.path.join(tokenizers_dir, model)
        tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
        with open(os.path.join(model_dir, "tokenizer_config.json"), encoding="utf-8") as f:
            config = json.load(f)
        plain = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
        add_special = install_transformers_post_processor(tok, config)
        cases = []
        for s in strings:
            text = s["text"]
            ids = plain.encode(text, add_special_tokens=False).ids
            assert tok.encode(text, add_special_tokens=False).ids == ids
            ids_special = tok.encode(text, add_special_tokens=True).ids
            cases.append({
                "name": s["name"],
                "text": text,
                "ids": ids,
                "ids_add_special": ids_special,
                "decoded": tok.decode(ids_special, skip_special_tokens=False),
                "decoded_skip_special": tok.decode(ids_special, skip_special_tokens=True),
            })
        cross_check_transformers(model_dir, cases)
        out = {
            "model": model,
            "generator": "scripts/make_tokenizer_fixtures.py",
            "tokenizers_version": tokenizers_version,
            "add_special": add_special,
            "vocab_size": tok.get_vocab_size(with_added_tokens=True),
            "cases": cases,
        }
        path = os.path.join(out_dir, f"{model}.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(out, f, ensure_ascii=False, indent=1)
            f.write("\n")
        print(f"{model}: {len(cases)} cases -> {path} ({add_special['source']})")


if __name__ == "__main__":
    main()
