import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

SHARED_VIDEOS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "videos"


def random_inputs(cfg, hidden, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    n = cfg.grid * cfg.grid
    features = torch.randn(cfg.frames, n, hidden, generator=g)
    shallow = torch.rand(cfg.frames, n, generator=g)
    deep = torch.rand(cfg.frames, n, generator=g)
    return features.to(dtype), shallow, deep


@pytest.fixture
def shared_videos():
    videos = sorted(SHARED_VIDEOS.glob("*.mp4"))
    if not videos:
        pytest.skip(f"no shared videos at {SHARED_VIDEOS}")
    return videos
