"""Latency validation against the reference, as one table: per stage, the reference (PyTorch eager, Hugging Face's
video path with every visual token, fp32 LLM) and the deployed path (the bundle on the device runtime: exported
graph + AOT on ONNX Runtime, int4 ONNX LLM), p50 over N runs after W warm-ups, the speedup, and the fidelity
verdict of the deployed chain (`runtime.chain.validate_chain`: vision gates + first-token KL / top-1 against the
reference) beside it.

    python bench/latency_validation.py EXPORT LLM BUNDLE --video V [--warmup 1 --repeat 5]
"""

from __future__ import annotations

import argparse
import json

from aot_export.report import format_table
from runtime.chain import validate_chain
from runtime.device.pipeline import DevicePipeline, measure
from runtime.pipeline import Pipeline

PROMPT = "What is happening in this video?"
ROWS = (("decode", "decode", "decode"), ("preprocess", "preprocess", "preprocess"),
        ("vision (+ AOT deployed)", "vision", "vision + AOT"), ("prompt assembly", "prompt assembly", "prompt assembly"),
        ("LLM prefill", "LLM prefill", "LLM prefill"), ("time to first token", "time to first token",
                                                        "time to first token"),
        ("LLM decode (16 tokens)", "LLM decode", "LLM decode"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("export")
    parser.add_argument("llm")
    parser.add_argument("bundle")
    parser.add_argument("--video", required=True)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    with Pipeline(args.export, backend="torch", llm="transformers", reduce=False) as reference:
        ref = measure(reference, args.video, PROMPT, 16, args.warmup, args.repeat)
    with DevicePipeline(args.bundle) as deployed:
        dep = measure(deployed, args.video, PROMPT, 16, args.warmup, args.repeat)
    chain = validate_chain(args.export, args.video, args.llm, prompt=PROMPT, tokens=16, progress=False)
    rows = []
    for label, ref_stage, dep_stage in ROWS:
        r, d = ref.latency[ref_stage]["p50"], dep.latency[dep_stage]["p50"]
        rows.append((label, f"{r * 1e3:.1f}", f"{d * 1e3:.1f}", f"{r / d:.2f}×"))
    verdict = (f"{'PASS' if chain.passed else 'FAIL'} (first-token KL {chain.metrics['first_token_kl']:.2g}, "
               f"top-1 {chain.metrics['first_token_top1']:.0%}, greedy match {chain.metrics['greedy_match']:.0%})")
    rows.append(("fidelity of the deployed chain", "reference", verdict, ""))
    rows.append(("prompt positions", ref.prompt_tokens, dep.prompt_tokens, ""))
    print(format_table(rows, (f"stage (p50 of {args.repeat})", "reference ms", "deployed ms", "speedup")))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"reference": ref.to_dict(), "deployed": dep.to_dict(), "chain": chain.to_dict()}, handle,
                      indent=1, default=str)


if __name__ == "__main__":
    main()
