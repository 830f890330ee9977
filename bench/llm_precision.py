"""Where the transformers-int8 LLM loses accuracy, and what replaces it: first-token KL and teacher-forced top-1
against the fp32 LLM on text prompts (chat template), plus CPU prefill / decode time.

    python bench/llm_precision.py --hf DIR [--onnx NAME=DIR ...] [--variants all] [--json FILE]

DIR: a Hugging Face causal-LM directory (e.g. the trained fixture's LLM saved on its own); an ONNX DIR: genai-builder
output (`inputs_embeds`). Variants (torch, all on the same fp32 weights):
  dynamic-int8          torch quantize_dynamic of the body and of lm_head as the old `transformers-int8` called it
                        (a bare Linear is never swapped: lm_head stays fp32; `transformers-int8` now wraps it)
  dynamic-int8-no-head  the body only (the same graph as dynamic-int8, which shows it)
  dynamic-int8-head     lm_head alone, called the same way (KL exactly 0: it is not quantized)
  w8-tensor             weights int8 per tensor (fake-quant), activations fp32
  w8-channel            weights int8 per output channel (fake-quant), activations fp32
  a8-tensor             activations int8 per tensor dynamically (fake-quant), weights fp32
  w8-channel-kernel     per-channel int8 weights through torch's int8 weight-only CPU kernel (_weight_int8pack_mm)
  dynamic-int8-channel  quantize_dynamic with per-channel weights (per_channel_dynamic_qconfig), lm_head too
  dynamic-int8-channel-fp32-down   the same with every mlp.down_proj kept fp32 (its inputs carry the outliers)
  a8-tensor-fp32-down   a8-tensor with every mlp.down_proj kept fp32
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

PROMPTS = ["What is the capital of France? Answer in one sentence.",
           "Explain in two sentences why the sky is blue.",
           "Write a haiku about a bicycle ride in the rain.",
           "List three uses of a paperclip."]


def softmax64(x):
    x = x.astype(np.float64) - x.max()
    e = np.exp(x)
    return e / e.sum()


def kl(p_logits, q_logits):
    p, q = softmax64(p_logits), softmax64(q_logits)
    return float(np.sum(p * (np.log(np.maximum(p, 1e-300)) - np.log(np.maximum(q, 1e-300)))))


class FakeLinear(nn.Module):
    def __init__(self, linear: nn.Linear, weight: str | None, act: bool):
        super().__init__()
        w = linear.weight.detach()
        if weight == "tensor":
            s = w.abs().max() / 127
            w = (w / s).round().clamp(-127, 127) * s
        elif weight == "channel":
            s = w.abs().amax(1, keepdim=True) / 127
            w = (w / s).round().clamp(-127, 127) * s
        self.weight, self.bias, self.act = w, linear.bias, act

    def forward(self, x):
        if self.act:      # dynamic per-tensor affine uint8, as quantize_dynamic's fbgemm path
            lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
            s = (hi - lo) / 255 or 1.0
            z = round(-lo / s)
            x = ((x / s).round() + z).clamp(0, 255).sub(z) * s
        return nn.functional.linear(x, self.weight, self.bias)


class Int8WeightOnly(nn.Module):
    """Per-output-channel symmetric int8 weights, fp32 activations: torch's CPU weight-only kernel."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(1).clamp(min=1e-12) / 127
        self.qweight = (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8).contiguous()
        self.scale, self.bias = scale.contiguous(), linear.bias

    def forward(self, x):
        shape = x.shape
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, shape[-1]).contiguous(), self.qweight, self.scale)
        y = y.reshape(*shape[:-1], -1)
        return y if self.bias is None else y + self.bias


def replace_linears(module: nn.Module, make) -> nn.Module:
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, make(child))
        else:
            replace_linears(child, make)
    return module


def variant(model, name):
    import copy
    import warnings
    body, head = copy.deepcopy(model.model), copy.deepcopy(model.lm_head)
    dyn = lambda m: torch.ao.quantization.quantize_dynamic(m, {nn.Linear}, dtype=torch.qint8)  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name == "dynamic-int8":
            body, head = dyn(body), dyn(head)
        elif name == "dynamic-int8-no-head":
            body = dyn(body)
        elif name == "dynamic-int8-head":
            head = dyn(head)
        elif name in ("w8-tensor", "w8-channel", "a8-tensor"):
            make = lambda l: FakeLinear(l, None if name == "a8-tensor" else name[3:], name == "a8-tensor")  # noqa
            body = replace_linears(body, make)
            head = make(head)
        elif name.startswith("dynamic-int8-channel"):
            from torch.ao.quantization import per_channel_dynamic_qconfig
            keep = "down_proj" if name.endswith("fp32-down") else None
            spec = {n: per_channel_dynamic_qconfig for n, m in body.named_modules()
                    if isinstance(m, nn.Linear) and not (keep and n.endswith(keep))}
            body = torch.ao.quantization.quantize_dynamic(body, spec, dtype=torch.qint8)
            wrapper = nn.Sequential(head)
            head = torch.ao.quantization.quantize_dynamic(wrapper, {nn.Linear: per_channel_dynamic_qconfig},
                                                          dtype=torch.qint8)[0]
        elif name == "a8-tensor-fp32-down":
            for n, m in list(body.named_modules()):
                for c, child in list(m.named_children()):
                    if isinstance(child, nn.Linear) and c != "down_proj":
                        setattr(m, c, FakeLinear(child, None, True))
            head = FakeLinear(head, None, True)
        elif name == "w8-channel-kernel":
            body = replace_linears(body, Int8WeightOnly)
            head = Int8WeightOnly(head)
        else:
            raise SystemExit(f"unknown variant {name}")
    return body.eval(), head.eval()


@torch.inference_mode()
def torch_generate(body, head, embed, embeds, n, forced=None):
    from transformers import DynamicCache
    cache = DynamicCache()
    t = time.perf_counter()
    out = body(inputs_embeds=embeds, past_key_values=cache, use_cache=True)
    logits = [head(out.last_hidden_state[:, -1]).float()[0].numpy()]
    prefill = time.perf_counter() - t
    tokens = []
    t = time.perf_counter()
    pos = embeds.shape[1]
    for i in range(n):
        tok = forced[i] if forced is not None else int(np.argmax(logits[-1]))
        tokens.append(tok)
        if i + 1 == n:
            break
        out = body(inputs_embeds=embed(torch.tensor([[tok]])), past_key_values=cache, use_cache=True,
                   position_ids=torch.tensor([[pos]]))
        pos += 1
        logits.append(head(out.last_hidden_state[:, -1]).float()[0].numpy())
    return tokens, logits, prefill, (time.perf_counter() - t) / max(n - 1, 1)


@torch.inference_mode()
def onnx_generate(session, layers, kv_heads, head_size, embed, embeds, n, forced=None):
    past = {f"past_key_values.{i}.{k}": np.zeros((1, kv_heads, 0, head_size), np.float32)
            for i in range(layers) for k in ("key", "value")}
    names = ["logits", *(k.replace("past_key_values", "present") for k in past)]
    length = embeds.shape[1]

    def forward(x):
        nonlocal past
        res = session.run(names, {"inputs_embeds": x, "attention_mask": np.ones((1, length), np.int64), **past})
        past = dict(zip(past, res[1:]))
        return res[0][0, -1]

    t = time.perf_counter()
    logits = [forward(embeds.numpy())]
    prefill = time.perf_counter() - t
    tokens = []
    t = time.perf_counter()
    for i in range(n):
        tok = forced[i] if forced is not None else int(np.argmax(logits[-1]))
        tokens.append(tok)
        if i + 1 == n:
            break
        length += 1
        logits.append(forward(embed(torch.tensor([[tok]])).numpy()))
    return tokens, logits, prefill, (time.perf_counter() - t) / max(n - 1, 1)


def compare(ref, logits):
    r, d = np.stack(ref).astype(np.float64), np.stack(logits).astype(np.float64)
    top2 = np.sort(r, -1)[:, -2:]
    return {"first_kl": kl(ref[0], logits[0]), "first_top1": float(r[0].argmax() == d[0].argmax()),
            "tf_top1": float((r.argmax(-1) == d.argmax(-1)).mean()),
            "mean_kl": float(np.mean([kl(a, b) for a, b in zip(ref, logits)])),
            "ref_margin_first": float(top2[0, 1] - top2[0, 0]),
            "max_logit_err": float(np.abs(r - d).max())}


def outliers(model, tok, prompt):
    """Per Linear group: max |input activation| over its median channel max, and the per-tensor weight scale over the
    median per-channel scale — what per-tensor int8 of activations / weights costs."""
    stats = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            def hook(m, inp, out, name=name):
                x = inp[0].detach().reshape(-1, inp[0].shape[-1]).abs().amax(0)
                stats[name] = (float(x.max()), float(x.median()))
            hooks.append(mod.register_forward_hook(hook))
    ids = chat_ids(tok, prompt)
    with torch.inference_mode():
        model(ids)
    for h in hooks:
        h.remove()
    rows = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            w = mod.weight.detach().abs()
            ch = w.amax(1)
            kind = name.split(".")[-1]
            rows.setdefault(kind, []).append((stats[name][0], stats[name][0] / stats[name][1],
                                               float(ch.max() / ch.median()), name))
    return {kind: {"act_max": max(r[0] for r in v), "act_max_over_median_ch": max(r[1] for r in v),
                   "worst_layer_act": max(v)[3],
                   "weight_tensor_over_median_channel_scale": float(np.median([r[2] for r in v]))}
            for kind, v in rows.items()}


def chat_ids(tok, prompt):
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                  return_tensors="pt")
    return ids if torch.is_tensor(ids) else ids["input_ids"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf", required=True)
    parser.add_argument("--onnx", nargs="*", default=[], help="NAME=DIR")
    parser.add_argument("--variants", default="dynamic-int8,dynamic-int8-no-head,dynamic-int8-head,w8-tensor,"
                                              "w8-channel,a8-tensor,w8-channel-kernel")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--prefill-tokens", type=int, default=512, help="length of a synthetic prefill for timing")
    parser.add_argument("--json")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.hf, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(args.hf)
    embed = torch.inference_mode()(lambda ids: model.model.embed_tokens(ids).float())
    prompts = [embed(chat_ids(tok, p)) for p in PROMPTS]
    long = embed(torch.randint(0, 150000, (1, args.prefill_tokens)))
    refs = []
    results = {"prompts": PROMPTS}
    body, head = model.model.eval(), model.lm_head.eval()
    timing = []
    with torch.inference_mode():
        for e in prompts:
            tokens, logits, _, dec = torch_generate(body, head, embed, e, args.tokens)
            refs.append((tokens, logits))
            timing.append(dec)
        _, _, pre, _ = torch_generate(body, head, embed, long, 1)
    results["answers_fp32"] = [tok.decode(t) for t, _ in refs]
    results["fp32"] = {"prefill_ms": pre * 1e3, "decode_ms": float(np.median(timing)) * 1e3}
    print("fp32", results["fp32"], results["answers_fp32"], flush=True)
    results["outliers"] = outliers(model, tok, PROMPTS[0])
    print(json.dumps(results["outliers"], indent=1), flush=True)

    def evaluate(name, run):
        per = [compare(ref_logits, run(e, len(ref_tokens), ref_tokens)[1])
               for e, (ref_tokens, ref_logits) in zip(prompts, refs)]
        free = [tok.decode(run(e, args.tokens, None)[0]) for e in prompts[:1]]
        _, _, pre, _ = run(long, 1, None)
        dec = np.median([run(e, args.tokens, None)[3] for e in prompts[:1]])
        row = {key: float(np.mean([p[key] for p in per])) for key in per[0]}
        row.update(first_kl_max=max(p["first_kl"] for p in per), first_top1_all=min(p["first_top1"] for p in per),
                   per_prompt_first_kl=[p["first_kl"] for p in per], prefill_ms=pre * 1e3, decode_ms=dec * 1e3,
                   answer=free[0])
        results[name] = row
        print(name, {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)

    for name in filter(None, args.variants.split(",")):
        b, h = variant(model, name)
        evaluate(name, lambda e, n, f, b=b, h=h: torch_generate(b, h, embed, e, n, f))
        del b, h
    import onnxruntime as ort
    for spec in args.onnx:
        name, directory = spec.split("=", 1)
        cfg = json.loads((Path(directory) / "genai_config.json").read_text())["model"]["decoder"]
        opts = ort.SessionOptions()
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sess = ort.InferenceSession(str(Path(directory) / cfg["filename"]), opts, providers=["CPUExecutionProvider"])
        size = sum(p.stat().st_size for p in Path(directory).iterdir())
        evaluate(name, lambda e, n, f, s=sess: onnx_generate(s, cfg["num_hidden_layers"], cfg["num_key_value_heads"],
                                                             cfg["head_size"], embed, e, n, f))
        results[name]["size_mb"] = size / 1e6
        del sess
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
