"""What the parity-fixture generators share: the reference outputs of a model on a prompt and the files
they are written to (logits.npy, tokens.json, greedy.json, meta.json). Imported by make_*_fixtures.py."""
import json
import os

import numpy as np
import torch


def logits_and_greedy(model, tokens, n_greedy):
    """fp32 logits at every prompt position [T, vocab], and n_greedy greedy tokens (full re-forward each)."""
    with torch.no_grad():
        logits = model(tokens).logits[0].float().numpy()
        seq = tokens.clone()
        greedy = []
        for _ in range(n_greedy):
            nxt = int(model(seq).logits[0, -1].argmax())
            greedy.append(nxt)
            seq = torch.cat([seq, torch.tensor([[nxt]])], dim=1)
    return logits, greedy


def write_outputs(d, tokens, logits, greedy, meta):
    np.save(os.path.join(d, "logits.npy"), logits.astype(np.float32))
    with open(os.path.join(d, "tokens.json"), "w") as f:
        json.dump(tokens[0].tolist(), f)
    with open(os.path.join(d, "greedy.json"), "w") as f:
        json.dump(greedy, f)
    with open(os.path.join(d, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
