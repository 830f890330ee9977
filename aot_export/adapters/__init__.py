"""Model adapters, chosen from a table: Hugging Face `model_type` → adapter class.

`load_model("tiny-llava-ov")` builds a built-in architecture with seeded random weights;
`load_model("/path/to/checkpoint")` reads the directory's `config.json` and loads it locally, never downloading.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from ..errors import InputError
from .base import ModelAdapter, ModelInfo
from .cosmos3_edge import BUILTIN as COSMOS_BUILTIN
from .cosmos3_edge import Cosmos3EdgeAdapter
from .llava_onevision import BUILTIN as ONEVISION_BUILTIN
from .llava_onevision import LlavaOnevisionAdapter
from .qwen2_5_vl import BUILTIN as QWEN_BUILTIN
from .qwen2_5_vl import Qwen2_5_VLAdapter

ADAPTERS: dict[str, type[ModelAdapter]] = {
    adapter.model_type: adapter for adapter in (LlavaOnevisionAdapter, Qwen2_5_VLAdapter, Cosmos3EdgeAdapter)
}

BUILTIN_MODELS: dict[str, Callable[[], ModelAdapter]] = {**ONEVISION_BUILTIN, **QWEN_BUILTIN, **COSMOS_BUILTIN}


def load_model(model: str) -> ModelAdapter:
    if model in BUILTIN_MODELS:
        return BUILTIN_MODELS[model]()
    directory = Path(model)
    if not directory.is_dir():
        raise InputError(f"model {model!r} is neither a built-in ({', '.join(BUILTIN_MODELS)}) nor a checkpoint "
                         "directory; pass one of those")
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise InputError(f"{directory}: no config.json; pass a Hugging Face checkpoint directory")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except json.JSONDecodeError as exc:
        raise InputError(f"{config_file}: not valid JSON ({exc.msg}); pass an intact checkpoint") from exc
    if model_type not in ADAPTERS:
        raise InputError(f"{directory}: model_type {model_type!r} is not supported; supported: "
                         f"{', '.join(sorted(ADAPTERS))}")
    return ADAPTERS[model_type].from_checkpoint(directory)


__all__ = ["ADAPTERS", "BUILTIN_MODELS", "ModelAdapter", "ModelInfo", "load_model"]
