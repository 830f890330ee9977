"""Decode tokens/s of an ONNX LLM at a given context, KV cache copied through numpy vs bound in place (IOBinding).

    python bench/decode_kv.py LLM_DIR --context 1024 --tokens 32 --rounds 2

Random prompt embeddings and a random table for the generated tokens (the timing does not depend on values);
a decoder with 3-D `position_ids` (Qwen2.5-VL, Cosmos3-Edge) gets text positions 0 … context−1 on all three axes.
The two modes alternate per round and must produce the same tokens.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from runtime.device.decoder import OrtDecoder


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("llm")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    decoders = {kv: OrtDecoder(args.llm, kv=kv, allow_spinning=False) for kv in ("numpy", "bound")}
    hidden = decoders["bound"].hidden
    rng = np.random.default_rng(0)
    embeds = (rng.standard_normal((1, args.context, hidden)) * 0.02).astype(np.float32)
    table = (rng.standard_normal((1024, hidden)) * 0.02).astype(np.float32)
    positions = (np.broadcast_to(np.arange(args.context), (3, 1, args.context)).copy()
                 if decoders["bound"].position_axes == 3 else None)
    results = {kv: [] for kv in decoders}
    tokens = {}
    for _ in range(args.rounds):
        for kv, decoder in decoders.items():
            generation = decoder.generate(embeds, args.tokens, lambda t: table[t % 1024][None, None],
                                          position_ids=positions)
            results[kv].append(generation.decode_tokens_per_s)
            tokens[kv] = generation.tokens
    print(json.dumps({"context": args.context, "tokens": args.tokens, "position_axes": decoders["bound"].position_axes,
                      "decode_tokens_per_s": results,
                      "same_tokens": tokens["numpy"] == tokens["bound"]}, indent=1))


if __name__ == "__main__":
    main()
