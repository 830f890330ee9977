"""ONNX Runtime thread settings for the vision graph and the LLM prefill that follows it (2-core CPU).

    python bench/spinning.py EXPORT_DIR LLM_DIR --rounds 5 [--frames-video V]

For each setting both sessions (vision graph, int4 LLM) are built with it; per round, alternating the settings,
the vision graph runs on the video's frames and the LLM prefill follows immediately, once with the AOT prompt
length and once with the no-reduction length (every pooled token) — p50 / max over rounds. Settings:
spinning on (ORT's default), spinning off (`session.intra_op.allow_spinning=0`), spinning on with
`session.force_spinning_stop=1` (threads stop spinning at the end of each run), and 1 thread per session.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import onnxruntime as ort

from aot_export.manifest import read_manifest
from aot_export.preprocess import preprocess_frames
from aot_export.video import decode_frames
from runtime.device.decoder import OrtDecoder

SETTINGS = {
    "spin on (default)": {"session.intra_op.allow_spinning": "1"},
    "spin off": {"session.intra_op.allow_spinning": "0"},
    "spin on + force_spinning_stop": {"session.intra_op.allow_spinning": "1", "session.force_spinning_stop": "1"},
    "spin off, 1 thread": {"session.intra_op.allow_spinning": "0", "threads": "1"},
}
CHAT_TOKENS = 25                     # the rest of the prompt around the video (tiny tokenizer, measured: 214 - 189)


def session(path, entries):
    options = ort.SessionOptions()
    for key, value in entries.items():
        if key == "threads":
            options.intra_op_num_threads = int(value)
        else:
            options.add_session_config_entry(key, value)
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("export")
    parser.add_argument("llm")
    parser.add_argument("--video", default="../shared/data/videos/bikes.mp4")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    manifest = read_manifest(args.export)
    pixels = preprocess_frames(decode_frames(args.video, manifest.aot.frames), manifest.preprocessing)
    lengths = {"with AOT": manifest.aot.output_tokens + 1 + CHAT_TOKENS,
               "without": manifest.aot.input_tokens + 1 + CHAT_TOKENS}
    runs = {}
    for name, entries in SETTINGS.items():
        decoder = OrtDecoder(args.llm)
        decoder.session = session(args.llm + "/model.onnx", entries)          # same graph, this setting
        runs[name] = (session(f"{args.export}/{manifest.graph}", entries), decoder)
    hidden = next(iter(runs.values()))[1].hidden
    rng = np.random.default_rng(0)
    embeds = {k: (rng.standard_normal((1, n, hidden)) * 0.02).astype(np.float32) for k, n in lengths.items()}
    table = (rng.standard_normal((16, hidden)) * 0.02).astype(np.float32)
    times = {name: {"vision": [], **{f"prefill {k}": [] for k in lengths}} for name in runs}
    for _ in range(args.rounds + 1):                                     # round 0 warms up
        for name, (vision, decoder) in runs.items():
            for key, x in embeds.items():
                start = time.perf_counter()
                vision.run(None, {manifest.inputs[0].name: pixels})
                times[name]["vision"].append(time.perf_counter() - start)
                generation = decoder.generate(x, 1, lambda t: table[t % 16][None, None])
                times[name][f"prefill {key}"].append(generation.prefill_s)
    summary = {name: {stage: {"p50_ms": round(float(np.median(v[1:] if stage != "vision" else v[2:])) * 1e3, 1),
                              "max_ms": round(float(np.max(v[1:] if stage != "vision" else v[2:])) * 1e3, 1)}
                      for stage, v in stages.items()} for name, stages in times.items()}
    print(json.dumps({"lengths": lengths, "rounds": args.rounds, "settings": summary}, indent=1))


if __name__ == "__main__":
    main()
