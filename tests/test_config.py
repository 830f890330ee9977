"""AOTConfig: validation, derived budgets, serialisation and the retention solver (AOT_SPEC §5)."""

import dataclasses
import hashlib
import json
import math
import re

import pytest

from aot_export import AOTConfig
from aot_export.config import AUTHORS_CLIP_LENGTHS, LEGACY_VALUES, UPPER_BOUNDS, clip_len_for
from aot_export.manifest import Manifest
from aot_export.preprocess import Preprocessing

# A small valid config; every invalid case below changes it in one place only.
BASE = dict(frames=8, clip_len=4, grid=9, windows=3, anchors=18, pooled_anchors=8, keep=2)


def names_field(message: str, field: str) -> bool:
    """The field name as a whole word: "anchors" must not be satisfied by "pooled_anchors"."""
    return re.search(rf"(?<![A-Za-z0-9_]){re.escape(field)}(?![A-Za-z0-9_])", message) is not None


def test_base_is_valid():
    cfg = AOTConfig(**BASE)
    assert (cfg.pooled_grid, cfg.local_per_window, cfg.global_anchors) == (5, 1, 9)


def test_names_field_is_strict():
    assert names_field("AOTConfig.anchors=3: x", "anchors")
    assert not names_field("AOTConfig.pooled_anchors=3: x", "anchors")


INVALID = {
    # name: (overrides of BASE, field the message must name)
    "clip_len-not-dividing-frames": (dict(clip_len=3), "clip_len"),
    "clip_len-zero": (dict(clip_len=0), "clip_len"),
    "clip_len-not-int": (dict(clip_len="4"), "clip_len"),
    "frames-zero": (dict(frames=0), "frames"),
    "sinkhorn_iters-zero": (dict(sinkhorn_iters=0), "sinkhorn_iters"),
    "pooled_anchors-over-cells": (dict(pooled_anchors=26), "pooled_anchors"),  # 5x5 = 25 cells
    "pooled_anchors-zero": (dict(pooled_anchors=0, keep=0), "pooled_anchors"),
    "keep-over-pooled_anchors": (dict(keep=9), "keep"),
    "keep-negative": (dict(keep=-1), "keep"),
    "anchors-not-splittable": (dict(anchors=10), "anchors"),           # floor(10*0.5) // 9 == 0
    "anchors-equal-grid2": (dict(anchors=81), "anchors"),
    "anchors-over-grid2": (dict(anchors=100), "anchors"),
    # 5x5 grid in 3 windows: rows split 2/2/1, so the smallest window holds one token; 18 anchors ask 1 each
    # with global_ratio 0.5, but 2 each with global_ratio 0.
    "local-over-smallest-window": (dict(grid=5, anchors=18, global_ratio=0.0, pooled_anchors=4, keep=1),
                                   "anchors"),
    "eps-zero": (dict(eps=0.0), "eps"),
    "eps-negative": (dict(eps=-0.1), "eps"),
    "eps-inf": (dict(eps=math.inf), "eps"),
    "eps-nan": (dict(eps=math.nan), "eps"),
    "sigma_t-zero": (dict(sigma_t=0.0), "sigma_t"),
    "sigma_t-negative": (dict(sigma_t=-1.5), "sigma_t"),
    "sigma_t-inf": (dict(sigma_t=math.inf), "sigma_t"),
    "beta-negative": (dict(beta=-0.5), "beta"),
    "beta-inf": (dict(beta=math.inf), "beta"),
    "beta-nan": (dict(beta=math.nan), "beta"),
    "lam-negative": (dict(lam=-1.0), "lam"),
    "lam-nan": (dict(lam=math.nan), "lam"),
    "alpha-negative": (dict(alpha=-0.1), "alpha"),
    "alpha-over-one": (dict(alpha=1.1), "alpha"),
    "alpha-nan": (dict(alpha=math.nan), "alpha"),
    "global_ratio-one": (dict(global_ratio=1.0), "global_ratio"),
    "pool_mode-unknown": (dict(pool_mode="nearest"), "pool_mode"),
    "windows-over-grid": (dict(windows=10), "windows"),
    "windows-zero": (dict(windows=0), "windows"),
    "pool-to-nothing": (dict(pool=10, pool_mode="average"), "pool"),
    "type-frames-float": (dict(frames=4.0), "frames"),
    "type-frames-bool": (dict(frames=True), "frames"),
    "type-keep-bool": (dict(keep=False), "keep"),
    "type-anchors-str": (dict(anchors="18"), "anchors"),
    "type-pool_mode-int": (dict(pool_mode=3), "pool_mode"),
    "type-eps-str": (dict(eps="0.1"), "eps"),
    "type-alpha-none": (dict(alpha=None), "alpha"),
    "type-beta-bool": (dict(beta=False), "beta"),
    "sinkhorn-unknown": (dict(sinkhorn="log"), "sinkhorn"),
    "type-sinkhorn-bool": (dict(sinkhorn=True), "sinkhorn"),
    "sinkhorn_max_iters-zero": (dict(sinkhorn_max_iters=0), "sinkhorn_max_iters"),
    "sinkhorn_tol-negative": (dict(sinkhorn_tol=-1e-2), "sinkhorn_tol"),
    "sinkhorn_tol-nan": (dict(sinkhorn_tol=math.nan), "sinkhorn_tol"),
    # (2 + 0.5·√2) / 0.04 = 67.7 > 60: the plain-domain kernel would come too close to fp32 underflow.
    "reference-eps-too-small": (dict(sinkhorn="reference", eps=0.04), "eps"),
}


def test_small_eps_is_fine_in_the_log_domain():
    assert AOTConfig(**BASE, sinkhorn="fixed", eps=0.04).eps == 0.04
    assert AOTConfig(**BASE, sinkhorn="reference", eps=0.05).eps == 0.05       # 54.1 <= 60


@pytest.mark.parametrize("name", INVALID)
def test_invalid_config_names_field(name):
    overrides, field = INVALID[name]
    with pytest.raises(ValueError) as exc:
        AOTConfig(**{**BASE, **overrides})
    assert names_field(str(exc.value), field), str(exc.value)


def test_local_over_smallest_window_needs_that_check():
    """The case above is rejected for the window size, not for some other limit: with one more window row the
    same anchors fit."""
    assert AOTConfig(**{**BASE, "grid": 6, "anchors": 18, "global_ratio": 0.0, "pooled_anchors": 4,
                        "keep": 1}).local_per_window == 2
    with pytest.raises(ValueError, match="smallest window"):
        AOTConfig(**{**BASE, "grid": 5, "anchors": 18, "global_ratio": 0.0, "pooled_anchors": 4, "keep": 1})


def test_default_anchors_not_splittable_over_windows():
    with pytest.raises(ValueError) as exc:
        AOTConfig(anchors=10, windows=3)
    assert names_field(str(exc.value), "anchors")


def test_from_dict_unknown_key():
    data = AOTConfig(**BASE).to_dict()
    data["frame_count"] = 8
    with pytest.raises(ValueError) as exc:
        AOTConfig.from_dict(data)
    assert "frame_count" in str(exc.value)


def test_from_json_unknown_key():
    with pytest.raises(ValueError, match="bogus"):
        AOTConfig.from_json('{"frames": 8, "bogus": 1}')


def test_from_dict_validates():
    with pytest.raises(ValueError) as exc:
        AOTConfig.from_dict({**BASE, "keep": 9})
    assert names_field(str(exc.value), "keep")


# ---- derived values ------------------------------------------------------------------------------------------
def test_default_budget():
    cfg = AOTConfig()
    assert (cfg.frames, cfg.clip_len, cfg.anchors, cfg.pooled_anchors, cfg.keep) == (32, 4, 126, 32, 10)
    assert cfg.cells_per_frame == 196
    assert cfg.tokens_per_clip == 2 * 32 + 3 * 10
    assert cfg.output_tokens == 8 * (2 * 32 + 3 * 10) == 752
    assert cfg.input_tokens == 32 * 196
    assert cfg.retention == pytest.approx(752 / (32 * 196), abs=1e-15)
    assert cfg.local_per_window == 7 and cfg.global_anchors == 126 - 63


@pytest.mark.parametrize("mode, pooled", [("bilinear", 14), ("average", 13)])
def test_pooled_grid(mode, pooled):
    cfg = AOTConfig(grid=27, pool_mode=mode)
    assert cfg.pooled_grid == pooled
    assert cfg.cells_per_frame == pooled ** 2
    assert cfg.input_tokens == cfg.frames * pooled ** 2


def test_pooled_grid_odd_small():
    assert AOTConfig(**BASE).pooled_grid == 5                            # ceil(9/2)
    assert AOTConfig(**{**BASE, "pool_mode": "average"}).pooled_grid == 4  # floor(9/2)


@pytest.mark.parametrize("frames, pooled_anchors, keep", [(32, 32, 10), (8, 8, 2), (3, 7, 5)])
def test_single_frame_clips(frames, pooled_anchors, keep):
    cfg = AOTConfig(frames=frames, clip_len=1, pooled_anchors=pooled_anchors, keep=keep)
    assert not cfg.inter_frame
    assert cfg.clips == frames
    assert cfg.output_tokens == frames * pooled_anchors
    assert cfg.retention == pytest.approx(pooled_anchors / cfg.cells_per_frame)


@pytest.mark.parametrize("clip_len", [2, 4, 8])
def test_output_tokens_per_clip(clip_len):
    cfg = AOTConfig(frames=32, clip_len=clip_len)
    assert cfg.output_tokens == (32 // clip_len) * (2 * 32 + (clip_len - 1) * 10)


# ---- serialisation and immutability ---------------------------------------------------------------------------
ROUND_TRIP = [
    AOTConfig(),
    AOTConfig(**BASE),
    AOTConfig(frames=64, clip_len=8, pool_mode="average", anchors=108, keep=3, alpha=0.0, beta=0.0,
              eps=0.05, sinkhorn_iters=100, lam=2.0, sigma_t=2.5, global_ratio=0.25),
    AOTConfig(**BASE, sinkhorn="reference", sinkhorn_max_iters=30, sinkhorn_tol=1e-3),
]


@pytest.mark.parametrize("cfg", ROUND_TRIP, ids=["default", "base", "custom", "reference"])
def test_json_round_trip(cfg):
    text = cfg.to_json()
    back = AOTConfig.from_json(text)
    assert back == cfg
    assert hash(back) == hash(cfg)
    assert back.hash == cfg.hash
    assert back.to_json() == text


@pytest.mark.parametrize("cfg", ROUND_TRIP, ids=["default", "base", "custom", "reference"])
def test_dict_round_trip(cfg):
    data = cfg.to_dict()
    assert set(data) == {f.name for f in dataclasses.fields(AOTConfig)}
    back = AOTConfig.from_dict(data)
    assert back == cfg
    assert hash(back) == hash(cfg)
    assert back.hash == cfg.hash


def test_config_written_before_the_solver_fields_loads_as_built():
    """A manifest from before `sinkhorn*` existed: it was built with the fixed solver, and its recorded hash (the
    sha256 of its sorted JSON, which engine sidecars compare) still matches."""
    old = {k: v for k, v in AOTConfig(**BASE, sinkhorn="fixed").to_dict().items() if not k.startswith("sinkhorn")}
    old["sinkhorn_iters"] = 7
    cfg = AOTConfig.from_recorded(old)
    assert (cfg.sinkhorn, cfg.sinkhorn_iters) == ("fixed", 7)
    manifest = Manifest(model={}, aot=cfg, preprocessing=Preprocessing(size=16, mean=(0.5,) * 3, std=(0.5,) * 3),
                        inputs=(), outputs=(), opset=18, files={}, versions={}).to_dict()
    manifest["aot"] = old                                       # as that manifest recorded it
    assert Manifest.from_dict(manifest).aot == cfg
    assert cfg.hash == hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:16]
    assert dataclasses.replace(cfg, sinkhorn="reference").hash != cfg.hash
    assert dataclasses.replace(cfg, sinkhorn_tol=1e-3).hash != cfg.hash


# ---- one config rule (issue 22): a new config's missing keys take today's defaults ---------------------------------
@pytest.mark.parametrize("partial", [{"frames": 8}, {"frames": 8, "sinkhorn_iters": 7}, {}])
def test_a_new_config_leaves_out_fields_at_todays_defaults(partial):
    """`export --config` with {"frames": 8} must export what `--frames 8` does (the "reference" solver); the
    legacy values are for manifests written before the field existed, nothing else."""
    cfg = AOTConfig.from_dict(partial)
    assert cfg == AOTConfig(**partial) and cfg.sinkhorn == "reference"
    assert AOTConfig.from_json(json.dumps(partial)) == cfg
    assert AOTConfig.from_recorded(partial).sinkhorn == LEGACY_VALUES["sinkhorn"] == "fixed"


def test_a_recorded_config_keeps_every_field_it_has():
    cfg = AOTConfig(**BASE, sinkhorn="reference", sinkhorn_max_iters=30, sinkhorn_tol=1e-3)
    assert AOTConfig.from_recorded(cfg.to_dict()) == cfg and AOTConfig.from_recorded(cfg.to_dict()).hash == cfg.hash


@pytest.mark.parametrize("data", [3, None, [1, 2], "frames"])
def test_a_config_that_is_not_an_object_is_refused(data):
    with pytest.raises(ValueError, match="a config is a JSON object of fields"):
        AOTConfig.from_dict(data)


# ---- upper bounds: the graph is static, so every count is memory or graph size (issue 22) ---------------------------
@pytest.mark.parametrize("name", UPPER_BOUNDS)
@pytest.mark.parametrize("over", [1, 10 ** 18])
def test_every_count_has_an_upper_bound_with_its_reason(name, over):
    most, why = UPPER_BOUNDS[name]
    with pytest.raises(ValueError) as exc:
        AOTConfig(**{**BASE, name: most + over})
    message = str(exc.value)
    assert names_field(message, name) and f"at most {most}" in message and why in message, message


def test_every_int_field_has_an_upper_bound():
    ints = {f.name for f in dataclasses.fields(AOTConfig) if f.type.startswith("int")}
    assert set(UPPER_BOUNDS) == ints


@pytest.mark.parametrize("data", [{"frames": 100000}, {"sinkhorn_max_iters": 100000000},
                                  {"sinkhorn": "fixed", "sinkhorn_iters": 10 ** 12}, {"grid": 10 ** 9}])
def test_the_issues_absurd_counts_are_refused_at_once(data):
    """Before the bound, frames=100000 asked the tiny model for 177 GB and 1e8 unrolled iterations never ended;
    a grid of 1e9 would loop over its rows (smallest_window)."""
    import time

    start = time.perf_counter()
    with pytest.raises(ValueError, match="at most"):
        AOTConfig.from_dict(data)
    assert time.perf_counter() - start < 0.1


def test_the_largest_counts_still_make_a_config():
    assert AOTConfig(frames=512, sinkhorn_max_iters=1000).frames == 512
    assert AOTConfig(frames=8, sinkhorn="fixed", sinkhorn_iters=1000).sinkhorn_iters == 1000


def test_hash_tells_configs_apart():
    assert AOTConfig().hash != AOTConfig(keep=9).hash
    assert AOTConfig() != AOTConfig(keep=9)


def test_frozen():
    cfg = AOTConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.frames = 16
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.keep = 0
    assert cfg.frames == 32 and cfg.keep == 10


# ---- from_retention ------------------------------------------------------------------------------------------
def one_more(cfg: AOTConfig, keep_ratio: float = 0.3) -> AOTConfig:
    a = cfg.pooled_anchors + 1
    return dataclasses.replace(cfg, pooled_anchors=a, keep=round(keep_ratio * a))


@pytest.mark.parametrize("target", [0.10, 0.15, 0.20, 0.25])
def test_from_retention_is_largest_within_target(target):
    cfg = AOTConfig.from_retention(32, target)
    a = cfg.pooled_anchors
    assert cfg.frames == 32
    assert cfg.keep == round(0.3 * a)
    assert cfg.retention <= target
    assert one_more(cfg).retention > target
    # The solved config is a valid config in its own right.
    assert AOTConfig.from_dict(cfg.to_dict()) == cfg
    assert 1 <= cfg.local_per_window <= cfg.smallest_window
    assert cfg.anchors < cfg.tokens_per_frame


def test_from_retention_grows_with_target():
    solved = [AOTConfig.from_retention(32, r) for r in (0.10, 0.15, 0.20, 0.25)]
    assert [c.pooled_anchors for c in solved] == sorted({c.pooled_anchors for c in solved})
    assert [c.anchors for c in solved] == sorted(c.anchors for c in solved)


def test_from_retention_explicit_anchors():
    cfg = AOTConfig.from_retention(32, 0.10, anchors=126)
    assert cfg.anchors == 126
    assert cfg.pooled_anchors == AOTConfig.from_retention(32, 0.10).pooled_anchors
    assert cfg.retention <= 0.10 < one_more(cfg).retention


@pytest.mark.parametrize("target", [1e-5, 1e-3])
def test_from_retention_too_low(target):
    with pytest.raises(ValueError, match="retention"):
        AOTConfig.from_retention(32, target)


@pytest.mark.parametrize("target", [0.0, -0.1, 1.5])
def test_from_retention_out_of_range(target):
    with pytest.raises(ValueError, match="retention"):
        AOTConfig.from_retention(32, target)


def test_from_retention_overrides():
    cfg = AOTConfig.from_retention(64, 0.15, clip_len=8, pool_mode="average")
    assert (cfg.frames, cfg.clip_len, cfg.pool_mode) == (64, 8, "average")
    assert cfg.cells_per_frame == 169
    assert cfg.keep == round(0.3 * cfg.pooled_anchors)
    assert cfg.retention <= 0.15 < one_more(cfg).retention
    # clip_len=8 allows a different (larger) A than clip_len=4 at the same retention.
    four = AOTConfig.from_retention(64, 0.15, clip_len=4, pool_mode="average")
    assert four.clip_len == 4
    assert cfg.pooled_anchors != four.pooled_anchors
    assert AOTConfig.from_retention(64, 0.15, pool_mode="average") == cfg      # 64 frames: clips of 8 by default


def test_from_retention_keep_ratio():
    cfg = AOTConfig.from_retention(32, 0.20, keep_ratio=0.1)
    assert cfg.keep == round(0.1 * cfg.pooled_anchors)
    assert cfg.retention <= 0.20 < one_more(cfg, keep_ratio=0.1).retention


# ---- clip length: the authors' code picks it from the frame count (AOT_SPEC §4) ---------------------------------
@pytest.mark.parametrize("frames, clip_len", [(32, 4), (64, 8), (4, 4), (8, 4), (16, 4), (40, 5), (48, 6),
                                              (100, 10), (128, 16)])
def test_clip_len_follows_the_frames(frames, clip_len):
    assert clip_len_for(frames) == clip_len
    assert AOTConfig(frames=frames).clip_len == clip_len
    assert AOTConfig(frames=frames, clip_len=None).clip_len == clip_len
    assert AOTConfig.from_retention(frames, 0.25).clip_len == clip_len


def test_clip_len_for_the_authors_counts_is_theirs():
    assert {frames: clip_len_for(frames) for frames in AUTHORS_CLIP_LENGTHS} == {32: 4, 64: 8}


def test_clip_len_keeps_eight_clips_where_whole_clips_allow():
    """The longest length up to frames/8 that divides the frames, never shorter than 4."""
    for frames in range(1, 257):
        clip_len = clip_len_for(frames)
        longer = [n for n in range(clip_len + 1, frames // 8 + 1) if frames % n == 0]
        assert clip_len >= 4 and not longer, frames
        if clip_len > 4:
            assert frames % clip_len == 0 and frames // clip_len >= 8, frames


def test_a_given_clip_len_wins():
    assert AOTConfig(frames=64, clip_len=4).clip_len == 4
    assert AOTConfig(frames=8, clip_len=1).clip_len == 1
    assert AOTConfig.from_retention(64, 0.15, clip_len=4).clip_len == 4
    assert dataclasses.replace(AOTConfig(frames=32), frames=64).clip_len == 4      # replace keeps the length


def test_frames_no_clip_length_divides_are_refused_naming_clip_len():
    with pytest.raises(ValueError) as exc:
        AOTConfig(frames=7)
    assert names_field(str(exc.value), "clip_len")


def test_the_solved_clip_len_is_recorded_in_the_manifest():
    cfg = AOTConfig(frames=64)
    assert cfg.to_dict()["clip_len"] == 8 and json.loads(cfg.to_json())["clip_len"] == 8
    manifest = Manifest(model={}, aot=cfg, preprocessing=Preprocessing(size=16, mean=(0.5,) * 3, std=(0.5,) * 3),
                        inputs=(), outputs=(), opset=18, files={}, versions={})
    data = json.loads(json.dumps(manifest.to_dict()))
    assert data["aot"]["clip_len"] == 8 and data["aot_hash"] == cfg.hash
    assert Manifest.from_dict(data).aot == cfg


# A 64-frame config as written before the clip length followed the frame count (clips of 4 whatever the frames),
# and the hashes that code gave it and the default config (engine sidecars record them).
WRITTEN_BEFORE_CLIP_LEN_FOLLOWED = (
    '{"alpha": 0.1, "anchors": 126, "beta": 0.5, "clip_len": 4, "eps": 0.1, "frames": 64, "global_ratio": 0.5, '
    '"grid": 27, "keep": 10, "lam": 1.0, "pool": 2, "pool_mode": "bilinear", "pooled_anchors": 32, '
    '"sigma_t": 1.5, "sinkhorn": "reference", "sinkhorn_iters": 10, "sinkhorn_max_iters": 100, '
    '"sinkhorn_tol": 0.01, "windows": 3}')


def test_a_config_written_before_clip_len_followed_the_frames_loads_and_hashes_as_built():
    cfg = AOTConfig.from_json(WRITTEN_BEFORE_CLIP_LEN_FOLLOWED)
    assert (cfg.frames, cfg.clip_len) == (64, 4)
    assert cfg.hash == "caa742cd0212ea95" and cfg.to_json() == WRITTEN_BEFORE_CLIP_LEN_FOLLOWED
    assert AOTConfig().hash == "2dda0989bb8ab3ef"
    assert AOTConfig(frames=64).hash != cfg.hash
