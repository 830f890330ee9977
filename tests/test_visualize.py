"""`runtime.visualize`: the trace is the reducer's computation, the PNG is written atomically, and each category's
colour is drawn where the masks say."""

import numpy as np
import pytest
import torch
from PIL import Image

from aot_export import AOTConfig, AOTReducer
from aot_export.errors import InputError
from aot_export.preprocess import preprocess_frames
from runtime import visualize as viz
from aot_export.video import decode_frames, synthesize_clip

CFG = AOTConfig(frames=8, clip_len=4)


@pytest.fixture(scope="module")
def adapter(tiny):
    return tiny


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return synthesize_clip(tmp_path_factory.mktemp("video") / "clip.mp4", frames=24)


@pytest.fixture(scope="module")
def traced(adapter, clip):
    """`video_trace` (decode, preprocess, encode, trace) once; the encoder outputs too, for the reducer checks."""
    frames_rgb, trace = viz.video_trace(adapter, clip, CFG)
    pixels = torch.from_numpy(preprocess_frames(decode_frames(clip, CFG.frames), adapter.preprocessing))
    return frames_rgb, trace, adapter.encode(CFG, pixels)


@pytest.fixture(scope="module")
def picture(adapter, clip, traced, tmp_path_factory):
    """`visualize` end to end, with the trace computed once above (the encoder is deterministic)."""
    frames_rgb, trace, _ = traced
    out = tmp_path_factory.mktemp("png") / "overlay.png"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(viz, "video_trace", lambda a, video, cfg: (frames_rgb, trace) if cfg == CFG else None)
        info = viz.visualize(adapter, clip, out, CFG, frames_shown=None, progress=False)
    return out, info, trace


@pytest.mark.parametrize("cfg", [CFG, AOTConfig(frames=4, clip_len=4, anchors=45, pooled_anchors=12, keep=0),
                                 AOTConfig(frames=4, clip_len=1)])
def test_trace_is_the_reducer(traced, cfg):
    features, shallow, deep = (x[:cfg.frames] for x in traced[2])
    trace = traced[1] if cfg == CFG else AOTReducer(cfg).trace(features, shallow, deep)
    tokens, index = AOTReducer(cfg)(features, shallow, deep)
    assert torch.equal(trace.tokens, tokens) and torch.equal(trace.index, index)
    anchors, cells = AOTReducer(cfg).select(shallow, deep)
    assert torch.equal(trace.anchors.union, anchors) and torch.equal(trace.cells, cells)
    assert not (trace.anchors.local & trace.anchors.global_).any()
    assert (trace.anchors.local.sum(1) == cfg.windows ** 2 * cfg.local_per_window).all()
    assert (trace.anchors.global_.sum(1) == cfg.global_anchors).all()
    # The output weight map is the reduction's linear map summed over output tokens:
    # Σ_out tokens = Σ_{t,i} weight[t,i] · x[t,i] · P/N (the map is normalised by the mean token's weight).
    scale = cfg.cells_per_frame / cfg.tokens_per_frame
    lhs = tokens.double().sum(0)
    rhs = (viz.output_weight(trace).double().unsqueeze(-1) * features.double()).sum((0, 1)) * scale
    assert torch.allclose(lhs, rhs, atol=1e-4 * lhs.abs().max())
    if cfg.inter_frame:
        later = ~trace.keyframes
        assert (trace.distinct[later].sum(1) == cfg.keep).all() and not trace.distinct[trace.keyframes].any()


def test_png_size_and_counts(picture):
    out, info, _ = picture
    image = Image.open(out)
    assert image.format == "PNG" and image.mode == "RGB"
    layout = viz.layout_for(CFG, viz.shown_frames(CFG, None), 384)
    assert image.size == (layout.width, layout.height) == tuple(info["size"])
    assert info["frames_shown"] == list(range(8)) and info["tile"] == 384
    assert (info["input_tokens"], info["output_tokens"]) == (CFG.input_tokens, CFG.output_tokens)
    assert info["random_weights"] is True
    assert info["png_bytes"] == out.stat().st_size
    assert not [p for p in out.parent.iterdir() if p.name != out.name]          # no staging file left


def _pixels_near(pixels, x, y, radius=1):
    x, y = int(round(x)), int(round(y))
    patch = pixels[y - radius: y + radius + 1, x - radius: x + radius + 1].reshape(-1, 3)
    return {tuple(p) for p in patch.tolist()}


def _clear_of_text(layout, frame, x, y):
    """Below the tile's label (the top ~24 px of a tile carry the frame tag)."""
    return y > layout.origins[frame][1] + 26


def test_category_colours_where_masks_say(picture):
    out, info, trace = picture
    pixels = np.asarray(Image.open(out).convert("RGB"))
    layout = viz.layout_for(CFG, viz.shown_frames(CFG, None), info["tile"])
    g, gp = CFG.grid, CFG.pooled_grid
    for frame in (0, 1, 5):
        for mask, colour in ((trace.anchors.local[frame], viz.LOCAL_COLOUR),
                             (trace.anchors.global_[frame], viz.GLOBAL_COLOUR)):
            checked = 0
            for token in torch.nonzero(mask).flatten().tolist():
                x, y = layout.token_centre(frame, token, g)
                if _clear_of_text(layout, frame, x, y):
                    assert tuple(pixels[int(y), int(x)]) == colour, (frame, token)
                    checked += 1
            assert checked > 10
    # No anchor colour where there is no anchor (token centres far from every anchor dot).
    anchors = torch.nonzero(trace.anchors.union[2]).flatten().tolist()
    free = [t for t in range(g * g) if all(abs(t // g - a // g) + abs(t % g - a % g) > 1 for a in anchors)]
    for token in free[:50]:
        x, y = layout.token_centre(2, token, g)
        assert tuple(pixels[int(y), int(x)]) not in (viz.LOCAL_COLOUR, viz.GLOBAL_COLOUR)

    dots = {f: [layout.token_centre(f, t, g) for t in torch.nonzero(trace.anchors.union[f]).flatten().tolist()]
            for f in range(CFG.frames)}

    def outline_colour_seen(frame, cell, colour):
        x0, y0, x1, y1 = layout.cell_box(frame, cell, gp)
        for x, y in ((x0, (y0 + y1) / 2), ((x0 + x1) / 2, y1), (x1, (y0 + y1) / 2), ((x0 + x1) / 2, y0)):
            far = all((x - dx) ** 2 + (y - dy) ** 2 > (viz.DOT_RADIUS + 3) ** 2 for dx, dy in dots[frame])
            if far and _clear_of_text(layout, frame, x, y - 2) and colour in _pixels_near(pixels, x, y):
                return True
        return False

    for frame in (1, 2, 3, 5):                      # non-key frames: every distinct cell outlined in yellow
        distinct = trace.cells[frame][trace.distinct[frame]].tolist()
        assert len(distinct) == CFG.keep
        seen = [outline_colour_seen(frame, cell, viz.DISTINCT_COLOUR) for cell in distinct]
        assert sum(seen) >= CFG.keep // 2
    for frame in (0, 4):                            # keyframes: kept cells in white, no yellow anywhere
        seen = [outline_colour_seen(frame, cell, viz.KEY_CELL_COLOUR) for cell in trace.cells[frame].tolist()]
        assert sum(seen) >= CFG.pooled_anchors // 2
        x0, y0 = layout.origins[frame]
        tile = pixels[y0: y0 + layout.tile, x0: x0 + layout.tile]
        assert not (tile == np.array(viz.DISTINCT_COLOUR)).all(-1).any()
    for frame in range(CFG.frames):                 # the red frame marks exactly the keyframes
        x0, y0 = layout.origins[frame]
        border = tuple(pixels[y0 + layout.tile // 2, x0 - 2])
        assert (border == viz.KEY_COLOUR) == (frame % CFG.clip_len == 0)


def test_png_is_written_atomically(adapter, clip, traced, tmp_path, monkeypatch):
    frames_rgb, trace, _ = traced
    monkeypatch.setattr(viz, "video_trace", lambda a, video, cfg: (frames_rgb, trace))
    out = tmp_path / "overlay.png"
    out.write_bytes(b"previous")

    def broken_save(self, fp, *args, **kwargs):
        open(fp, "wb").write(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError):
        viz.visualize(adapter, clip, out, CFG, frames_shown=4, progress=False)
    assert out.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["overlay.png"]


@pytest.mark.parametrize("content", [None, b"not a video at all" * 100])
def test_bad_video_is_input_error(adapter, tmp_path, content):
    video = tmp_path / "video.mp4"
    if content is not None:
        video.write_bytes(content)
    with pytest.raises(InputError, match="video.mp4"):
        viz.visualize(adapter, video, tmp_path / "out.png", CFG, progress=False)
    assert not (tmp_path / "out.png").exists()


def test_wrong_grid_is_input_error(adapter, clip, tmp_path):
    with pytest.raises(InputError, match="grid"):
        viz.visualize(adapter, clip, tmp_path / "out.png", AOTConfig(frames=8, grid=24), progress=False)


def test_shown_frames_are_whole_clips_spread_over_the_video():
    cfg = AOTConfig()
    assert viz.shown_frames(cfg, 8) == [[0, 1, 2, 3], [28, 29, 30, 31]]
    assert viz.shown_frames(cfg, 12) == [[0, 1, 2, 3], [16, 17, 18, 19], [28, 29, 30, 31]]
    assert len(viz.shown_frames(cfg, None)) == 8 and viz.shown_frames(cfg, 1) == [[0, 1, 2, 3]]
    assert viz.shown_frames(AOTConfig(frames=8, clip_len=1), None) == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_video_trace_is_what_the_runtime_feeds(traced):
    """The traced frames are the model-size frames; the trace is of `adapter.encode` on the runtime's
    preprocessing of the same video (test_trace_is_the_reducer[cfg0] checks it against the reducer)."""
    frames_rgb, trace, _ = traced
    assert frames_rgb.shape == (CFG.frames, 384, 384, 3) and frames_rgb.dtype == np.uint8
    assert trace.tokens.shape == (CFG.output_tokens, 64)


def test_trace_works_under_inference_mode():
    from conftest import random_inputs

    cfg = AOTConfig(frames=4)
    features, shallow, deep = random_inputs(cfg, 32)
    with torch.inference_mode():
        inside = AOTReducer(cfg).trace(features, shallow, deep)
        inside_weight = viz.output_weight(inside)
    outside = AOTReducer(cfg).trace(features, shallow, deep)
    assert torch.equal(inside_weight, viz.output_weight(outside)) and torch.equal(inside.tokens, outside.tokens)
