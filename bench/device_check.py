"""The device runtime against the reference chain, across two Python environments (CI, `.ci/run`).

    python bench/device_check.py reference --export EXPORT --llm LLM --video V --out ref.json   # the full install
    python bench/device_check.py device --bundle BUNDLE --video V --reference ref.json            # runtime-only venv

`reference`: the reference pipeline (`runtime.pipeline.Pipeline`: the export on ONNX Runtime, the prompt
assembled with the Hugging Face model's tokenizer and embedding table, the same int4 ONNX LLM) → greedy tokens, the
first token's logits, the prompt's ids and positions. `device`: the bundle on `runtime.device` → the same; exit 1
unless the greedy tokens, prompt ids and positions (3-D for Qwen2.5-VL and Cosmos3-Edge) are equal, the first-token
KL(reference ‖ device) ≤ 1e-5, and no torch / transformers / onnx / onnxscript module was loaded. Every family.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

PROMPT = "What is happening in this video?"
TOKENS = 16
KL_GATE = 1e-5
FORBIDDEN = ("torch", "transformers", "onnx", "onnxscript")


def kl_divergence(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """KL(p ‖ q) of two logit vectors (runtime.chain.kl_divergence, which needs the reference stack)."""
    def log_softmax(x):
        x = x.astype(np.float64) - x.max()
        return x - np.log(np.exp(x).sum())
    lp, lq = log_softmax(p_logits), log_softmax(q_logits)
    return float(np.sum(np.exp(lp) * (lp - lq)))


def positions_list(positions) -> list | None:
    return None if positions is None else np.asarray(positions).tolist()


def reference(args) -> int:
    from aot_export.preprocess import preprocess_frames
    from aot_export.video import decode_frames
    from runtime.pipeline import Pipeline
    from runtime.prompt import assemble

    with Pipeline(args.export, llm=args.llm) as pipeline:
        pixels = preprocess_frames(decode_frames(args.video, pipeline.frames), pipeline.preprocessing)
        visual, index = pipeline.visual_tokens_at(pixels)
        inputs = assemble(pipeline.adapter, PROMPT, visual, index, pipeline.adapter.aot_frames(len(pixels)))
        generation = pipeline.llm.generate(inputs.embeds, TOKENS, eos=pipeline.eos, **inputs.generate_kwargs)
    payload = {"tokens": generation.tokens, "first_logits": generation.step_logits[0].tolist(),
               "prompt_ids": inputs.input_ids[0].tolist(), "position_ids": positions_list(inputs.position_ids)}
    with open(args.out, "w") as handle:
        json.dump(payload, handle)
    print(f"reference: {len(generation.tokens)} tokens, prompt {inputs.length} positions -> {args.out}")
    return 0


def device(args) -> int:
    from aot_export.preprocess import preprocess_frames
    from aot_export.video import decode_frames
    from runtime.device.pipeline import DevicePipeline

    start = time.perf_counter()
    with DevicePipeline(args.bundle) as pipeline:
        pixels = preprocess_frames(decode_frames(args.video, pipeline.frames), pipeline.preprocessing)
        prompt = pipeline.assemble(PROMPT, pipeline.vision.run(pixels))
        generation = pipeline.generate(prompt, TOKENS)
    seconds = time.perf_counter() - start
    ref = json.loads(open(args.reference).read())
    kl = kl_divergence(np.asarray(ref["first_logits"]), generation.step_logits[0])
    loaded = sorted({m.split(".")[0] for m in sys.modules} & set(FORBIDDEN))
    checks = {"greedy tokens equal": generation.tokens == ref["tokens"], f"first-token KL ≤ {KL_GATE:g}": kl <= KL_GATE,
              "prompt ids equal": prompt.input_ids.tolist() == ref["prompt_ids"],
              "prompt positions equal": positions_list(prompt.position_ids) == ref["position_ids"],
              "no torch/transformers/onnx": not loaded}
    print(json.dumps({"tokens": generation.tokens, "reference_tokens": ref["tokens"], "first_token_kl": kl,
                      "prompt_tokens": prompt.length, "position_axes": 1 if prompt.position_ids is None else 3,
                      "forbidden_modules_loaded": loaded, "seconds": seconds, "checks": checks}, indent=2))
    return 0 if all(checks.values()) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="side", required=True)
    ref = sub.add_parser("reference")
    ref.add_argument("--export", required=True)
    ref.add_argument("--llm", required=True)
    ref.add_argument("--video", required=True)
    ref.add_argument("--out", required=True)
    dev = sub.add_parser("device")
    dev.add_argument("--bundle", required=True)
    dev.add_argument("--video", required=True)
    dev.add_argument("--reference", required=True)
    args = parser.parse_args()
    return reference(args) if args.side == "reference" else device(args)


if __name__ == "__main__":
    sys.exit(main())
