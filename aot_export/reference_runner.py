"""The PyTorch reference as a runner (`aot_export.runners` interface): the adapter's `reference(cfg, frames)` —
the Hugging Face tower with its own eager attention, the projector and `AOTReducer` — which every deployed
backend is compared with. It lives apart from `aot_export.runners` because it needs torch."""

from __future__ import annotations

import time
from collections import OrderedDict

import numpy as np
import torch
from polygraphy.common import TensorMetadata

from .adapters.base import ModelAdapter
from .config import AOTConfig
from .runners import VisionRunner


class TorchReferenceRunner(VisionRunner):
    backend = "torch"

    def __init__(self, adapter: ModelAdapter, cfg: AOTConfig, input_name: str = "frames", name: str | None = None):
        super().__init__(input_name, name or "torch-reference",
                         {"model": adapter.info.model_id, "aot_hash": cfg.hash})
        adapter.check_fits(cfg)
        self.adapter, self.cfg = adapter, cfg

    def get_input_metadata_impl(self) -> TensorMetadata:
        size = self.adapter.info.image_size
        return TensorMetadata().add(self.input_name, np.float32, (self.cfg.frames, 3, size, size))

    @torch.inference_mode()
    def infer_impl(self, feed_dict: dict[str, np.ndarray]) -> OrderedDict:
        start = time.perf_counter()
        tokens, index = self.adapter.reference(self.cfg, torch.from_numpy(np.asarray(feed_dict[self.input_name])))
        self._timed(start)
        return OrderedDict(tokens=tokens.numpy(), index=index.numpy())
