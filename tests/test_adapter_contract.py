"""`ModelAdapter` is the whole contract: everything aot_export/, runtime/ and bench/ use of an adapter is declared
on it, a family that leaves a member out cannot be instantiated, and the built-in adapter meets the shapes the
declarations state."""

import ast
import inspect
from pathlib import Path

import pytest
import torch

from aot_export import AOTConfig
from aot_export.adapters import ADAPTERS, ModelAdapter

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("aot_export", "runtime", "bench")
# What the runtime, the exporter and the studies need of a model family (the list); the contract must
# keep declaring each, abstract, so that a new family implements it.
REQUIRED = {"from_checkpoint", "info", "preprocessing", "vision_aot", "encode", "reference", "full_video_features",
            "tokenizer", "video_token_id", "image_newline", "embed_tokens", "decoder", "save_language_model"}


def adapter_attributes(source: str) -> set[str]:
    """Names read off an adapter in `source`: `adapter.x`, `self.adapter.x`, `getattr(adapter, "x")`."""
    names = set()

    def is_adapter(node: ast.AST) -> bool:
        return ((isinstance(node, ast.Name) and node.id == "adapter")
                or (isinstance(node, ast.Attribute) and node.attr == "adapter"))

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and is_adapter(node.value):
            names.add(node.attr)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr")
              and len(node.args) >= 2 and is_adapter(node.args[0]) and isinstance(node.args[1], ast.Constant)):
            names.add(node.args[1].value)
    return names


def used_attributes() -> dict[str, list[str]]:
    """name → the files that read it off an adapter."""
    uses: dict[str, list[str]] = {}
    for package in SCANNED:
        for path in sorted((ROOT / package).rglob("*.py")):
            for name in adapter_attributes(path.read_text()):
                uses.setdefault(name, []).append(str(path.relative_to(ROOT)))
    return uses


def declared(name: str) -> bool:
    return hasattr(ModelAdapter, name) or name in ModelAdapter.__annotations__


def test_the_scan_sees_adapter_attributes():
    source = "def f(adapter, self):\n    adapter.model.config\n    self.adapter.decoder()\n" \
             "    getattr(adapter, 'tokenizer', None)\n    other.info\n"
    assert adapter_attributes(source) == {"model", "decoder", "tokenizer"}
    assert not declared("model")                   # a use like bench/quality.py's former adapter.model fails below


def test_every_attribute_used_is_declared():
    uses = used_attributes()
    # The scan finds the runtime's uses (a broken scan would pass vacuously).
    assert {"tokenizer", "video_token_id", "image_newline", "embed_tokens", "decoder", "full_video_features",
            "save_language_model", "encode", "info", "preprocessing"} <= set(uses)
    undeclared = {name: files for name, files in uses.items() if not declared(name)}
    assert not undeclared, f"used on adapters but not declared on ModelAdapter: {undeclared}"


def test_contract_members_are_abstract_and_documented():
    assert REQUIRED <= ModelAdapter.__abstractmethods__
    for name in ModelAdapter.__abstractmethods__ | {"example_frames", "check_fits"}:
        member = inspect.getattr_static(ModelAdapter, name)
        member = getattr(member, "fget", None) or getattr(member, "__func__", None) or member
        assert (member.__doc__ or "").strip(), f"ModelAdapter.{name} has no docstring"


def implementation(missing: str | None = None) -> type:
    """A ModelAdapter subclass implementing every abstract member but `missing`."""
    namespace = {"model_type": "partial"}
    for name in ModelAdapter.__abstractmethods__ - {missing}:
        member = inspect.getattr_static(ModelAdapter, name)
        if isinstance(member, property):
            namespace[name] = property(lambda self: None)
        elif isinstance(member, classmethod):
            namespace[name] = classmethod(lambda cls, directory: cls())
        else:
            namespace[name] = lambda self, *args: None
    return type("Partial", (ModelAdapter,), namespace)


@pytest.mark.parametrize("missing", sorted(REQUIRED))
def test_a_family_missing_a_member_cannot_be_instantiated(missing):
    implementation()()                              # everything implemented: instantiable
    with pytest.raises(TypeError, match=missing):
        implementation(missing)()


def test_every_registered_adapter_implements_the_contract():
    for adapter_class in ADAPTERS.values():
        assert not adapter_class.__abstractmethods__, adapter_class
        assert isinstance(adapter_class.model_type, str)


def test_builtin_adapter_meets_the_declared_shapes(tiny):
    info = tiny.info
    hidden, grid = info.hidden, info.grid
    cfg = AOTConfig(frames=2, clip_len=2, grid=grid)
    frames = tiny.example_frames(2)
    assert frames.shape == (2, 3, info.image_size, info.image_size)
    assert tiny.preprocessing.size == info.image_size
    features, shallow, deep = tiny.encode(cfg, frames)
    assert features.shape == (2, grid * grid, hidden) and shallow.shape == deep.shape == (2, grid * grid)
    tokens, index = tiny.reference(cfg, frames)
    assert tokens.shape == (cfg.output_tokens, hidden) and index.shape == (cfg.output_tokens, 3)
    full = tiny.full_video_features(frames)
    assert full.shape == (2 * cfg.cells_per_frame + 1, hidden)
    assert torch.equal(full[-1], tiny.image_newline.detach())
    assert tiny.image_newline.shape == (hidden,)
    ids = torch.tensor([[1, 5, tiny.video_token_id]])
    assert tiny.embed_tokens(ids).shape == (1, 3, hidden)
    decoder, lm_head = tiny.decoder()
    with torch.no_grad():
        out = decoder(inputs_embeds=tiny.embed_tokens(ids))
        assert out.last_hidden_state.shape == (1, 3, hidden)
        assert lm_head(out.last_hidden_state[:, -1]).shape[:1] == (1,)
    assert tiny.tokenizer.convert_ids_to_tokens(tiny.video_token_id) == "<video>"


@pytest.mark.parametrize("model", ["tiny-llava-ov", "tiny-cosmos3-edge"])
def test_release_weights_empties_the_model_and_keeps_its_identity(model):
    """`quantize-llm` frees the weights once its route has what it needs (a 3B model did not fit otherwise)."""
    from aot_export.adapters import load_model

    adapter = load_model(model)
    stack, _ = adapter.decoder()
    before = sum(p.numel() for p in stack.parameters())
    info = adapter.info
    adapter.release_weights()
    assert before > 0 and sum(p.numel() for p in stack.parameters()) == 0
    assert adapter.info == info and adapter.context_length > 0
