#!/usr/bin/env python3
"""Renders every tests/fixtures/chat/<conversation>.json with transformers' apply_chat_template for each
tokenizer directory, writing tests/fixtures/chat/expected_<tokenizer>_<conversation>.txt; the C++ tests
(tests/chat_template_test.cpp) compare moeflux's renderer against these files.

Usage (on a machine with transformers):
  scripts/make_template_fixtures.py DEST            # DEST/qwen3, DEST/deepseek_v3 as fetch-tokenizers.sh makes
  scripts/make_template_fixtures.py DEST qwen3      # only some tokenizers

A conversation is {"messages": [...], "tools": [...]?, "add_generation_prompt": bool?, ...}; every other
key (e.g. "enable_thinking") is passed to the template as a keyword argument. A conversation the template
itself rejects (raises) gets no expected file, and is reported.
"""
import json
import pathlib
import sys

from transformers import AutoTokenizer

FIXTURES = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "chat"


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__)
        return 2
    root = pathlib.Path(sys.argv[1])
    names = sys.argv[2:] or sorted(p.name for p in root.iterdir() if (p / "tokenizer_config.json").exists())
    conversations = sorted(p for p in FIXTURES.glob("*.json"))
    for name in names:
        tokenizer = AutoTokenizer.from_pretrained(str(root / name))
        for path in conversations:
            conversation = json.loads(path.read_text(encoding="utf-8"))
            kwargs = {k: v for k, v in conversation.items() if k not in ("messages", "tools")}
            out = FIXTURES / f"expected_{name}_{path.stem}.txt"
            try:
                text = tokenizer.apply_chat_template(
                    conversation["messages"], tools=conversation.get("tools"), tokenize=False, **kwargs)
            except Exception as e:  # the template's own raise_exception, or a Jinja error
                print(f"{name}/{path.stem}: template failed ({type(e).__name__}: {e}); no expected file")
                out.unlink(missing_ok=True)
                continue
            # newline="" keeps the bytes exactly as rendered.
            with open(out, "w", encoding="utf-8", newline="") as f:
                f.write(text)
            print(f"wrote {out.relative_to(FIXTURES.parent.parent.parent)} ({len(text)} chars)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
