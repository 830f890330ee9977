"""`AOTConfig`: the one frozen, validated description of an AOT reduction (AOT_SPEC.md)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, fields
from typing import Any

POOL_MODES = ("bilinear", "average")
SINKHORN_SOLVERS = ("fixed", "reference")
# What a config written before a field existed was built with: such configs load, and hash, as they did.
LEGACY_VALUES = {"sinkhorn": "fixed", "sinkhorn_max_iters": 100, "sinkhorn_tol": 1e-2}
# The authors' code picks the inter-frame clip length from the frame count and refuses any other (AOT_SPEC §4).
AUTHORS_CLIP_LENGTHS = {32: 4, 64: 8}
CLIPS_PER_VIDEO = 8          # both of the authors' cases: 32 / 4 = 64 / 8
SHORTEST_CLIP = 4            # the authors' shorter length, the one every published result uses
# The plain-domain "reference" solver needs its kernel exp(-cost / eps) far above fp32's smallest normal (1.2e-38):
# exp(-60) = 8.8e-27 leaves 11 orders of magnitude for the scalings it is multiplied by.
PLAIN_DOMAIN_MAX_EXPONENT = 60.0
# Upper bounds of the counts. The graph is static, so each count is memory or graph size fixed at export; a value
# past these is a typo, and is refused before any model loads instead of ending as an allocation failure (100,000
# frames asked 177 GB of the tiny model) or an export that never ends.
MAX_FRAMES = 512               # the authors run 32 and 64; the graph holds every frame's activations at once
MAX_GRID = 64                  # 4,096 tokens a frame (896 px at patch 14); transport costs grow as grid**4
MAX_SINKHORN_ITERATIONS = 1000  # the authors stop by 100; every iteration costs graph size or run time
UPPER_BOUNDS = {
    "frames": (MAX_FRAMES, "the static graph holds every frame's activations at once, so its memory grows with "
                           "the frames; sample fewer frames"),
    "clip_len": (MAX_FRAMES, "a clip cannot hold more frames than a video takes"),
    "grid": (MAX_GRID, "the transport costs of a frame grow as grid**4; this is no vision tower's patch grid"),
    "windows": (MAX_GRID, "a frame has at most grid windows a side"),
    "pool": (MAX_GRID, "a pool wider than the largest grid pools it to one cell"),
    "anchors": (MAX_GRID ** 2, "anchors are a frame's tokens, at most grid**2"),
    "pooled_anchors": (MAX_GRID ** 2, "pooled anchors are a frame's pooled cells, at most grid**2"),
    "keep": (MAX_GRID ** 2, "kept tokens are a frame's pooled cells, at most grid**2"),
    "sinkhorn_iters": (MAX_SINKHORN_ITERATIONS, "each iteration is unrolled into the static graph, so its size "
                                                "and export time grow with them"),
    "sinkhorn_max_iters": (MAX_SINKHORN_ITERATIONS, "each iteration runs in every call of the graph (one Scan step "
                                                    "each, even once converged), so its run time grows with them"),
}


def clip_len_for(frames: int) -> int:
    """The clip length `frames` AOT frames (grids: a Qwen2.5-VL temporal patch is one) get unless one is given.

    The authors' 32 → 4 and 64 → 8 both cut the video into eight clips, so other counts do too where they can: the
    longest length up to frames/8 that divides `frames`, never shorter than 4 — shorter clips than any the authors
    ran would merge less, and a clip of one frame turns the stage off. Below 32 frames that is 4; where no length
    from 4 to frames/8 divides `frames` it is 4 as well, which the config refuses unless 4 divides `frames`.
    """
    longest = frames // CLIPS_PER_VIDEO
    return max((n for n in range(SHORTEST_CLIP, longest + 1) if frames % n == 0), default=SHORTEST_CLIP)


@dataclass(frozen=True)
class AOTConfig:
    """Static budgets and hyper-parameters of AOT for one video of `frames` frames.

    Defaults follow the authors' reference code for LLaVA-OneVision-7B at 32 frames (AOT_SPEC §5). `clip_len` left
    out follows `frames` as the authors' code does (`clip_len_for`: 32 → 4, 64 → 8, other counts by the same
    eight-clip rule) and is stored solved; a given `clip_len` wins, and `dataclasses.replace(cfg, frames=...)`
    keeps the length `cfg` has.

    Sinkhorn: `sinkhorn="reference"` (default) reproduces the authors' stopping in the static graph —
    `sinkhorn_max_iters` (100, their maximum) plain-domain iterations (one ONNX Scan), r and c frozen after the first
    iteration whose mean |r - r_prev| is below `sinkhorn_tol` (1e-2), one flag for all frames of the intra-frame
    call and one per clip for each inter-frame step. `sinkhorn="fixed"` runs `sinkhorn_iters` log-domain iterations
    whatever the data (what exports before this field were built with; `sinkhorn_iters` is only read by it).
    Chosen by measurement (docs/benchmarks.md, bench/sinkhorn_iters.py, bench/agreement.py, bench/overhead.py,
    real footage with random-projection features): against the float64 authors' stopping, "reference" gives index
    agreement 1.0 and max relative error <= 1e-5 on both videos and all four benchmark configs, "fixed" 0.93-1.0
    and 0.36-2.9; reducer time at H = 896 / 3584 was 166-173 / 336-341 ms for "reference" against 204-205 /
    365-375 ms for "fixed" (0.14 % / 0.28 % of a SigLIP-so400m encoder on 32 frames against 0.17 % / 0.31 %, two
    quiet runs). Its costs: a larger graph (tiny model, 32 frames: 5,112 ONNX nodes and a 52.4 MB TensorRT-RTX plan
    against 1,037 and 20.1 MB), and — as in the authors' code — a frame's result depends on the other frames.
    """

    frames: int = 32
    clip_len: int | None = None            # None: clip_len_for(frames), solved on construction
    grid: int = 27
    windows: int = 3
    pool: int = 2
    pool_mode: str = "bilinear"
    anchors: int = 126
    pooled_anchors: int = 32
    keep: int = 10
    sinkhorn: str = "reference"            # or "fixed"
    sinkhorn_iters: int = 10
    sinkhorn_max_iters: int = 100
    sinkhorn_tol: float = 1e-2
    eps: float = 0.1
    beta: float = 0.5
    alpha: float = 0.1
    lam: float = 1.0
    sigma_t: float = 1.5
    global_ratio: float = 0.5

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            kind = f.type.removesuffix(" | None")
            if value is None and kind != f.type:
                continue
            expected = {"int": int, "float": (int, float), "str": str}[kind]
            if isinstance(value, bool) or not isinstance(value, expected):
                raise ValueError(f"AOTConfig.{f.name} must be {kind}, got {value!r}")
        # Before anything counts through the frames or the grid (clip_len_for, smallest_window).
        for name, (most, why) in UPPER_BOUNDS.items():
            if getattr(self, name) is not None and getattr(self, name) > most:
                raise ValueError(f"AOTConfig.{name}={getattr(self, name)!r}: at most {most}; {why}")
        if self.clip_len is None:
            # Solved once, here, so that to_dict, the manifest and the hash record the length used, never None.
            object.__setattr__(self, "clip_len", clip_len_for(self.frames))
        self._validate()

    def _validate(self) -> None:
        def fail(name: str, why: str) -> None:
            raise ValueError(f"AOTConfig.{name}={getattr(self, name)!r}: {why}")

        for name in ("frames", "clip_len", "grid", "windows", "pool", "anchors", "pooled_anchors",
                     "sinkhorn_iters", "sinkhorn_max_iters"):
            if getattr(self, name) < 1:
                fail(name, "must be >= 1")
        if self.frames % self.clip_len:
            fail("clip_len", f"must divide frames={self.frames} into whole clips")
        if self.pool_mode not in POOL_MODES:
            fail("pool_mode", f"must be one of {POOL_MODES}")
        if self.windows > self.grid:
            fail("windows", f"cannot exceed grid={self.grid}")
        if self.pooled_grid < 1:
            fail("pool", f"pools grid={self.grid} to nothing")
        if not 0.0 <= self.global_ratio < 1.0:
            fail("global_ratio", "must be in [0, 1)")
        if self.anchors >= self.tokens_per_frame:
            fail("anchors", f"must be < grid**2={self.tokens_per_frame} so that some tokens are pruned")
        if self.local_per_window < 1:
            fail("anchors", f"{self.anchors} anchors with global_ratio={self.global_ratio} leave no local "
                            f"anchor for each of the {self.windows ** 2} windows; raise anchors or lower windows")
        if self.local_per_window > self.smallest_window:
            fail("anchors", f"asks {self.local_per_window} local anchors per window, but the smallest window "
                            f"has {self.smallest_window} tokens")
        if self.pooled_anchors > self.cells_per_frame:
            fail("pooled_anchors", f"must be <= pooled cells per frame ({self.cells_per_frame})")
        if not 0 <= self.keep <= self.pooled_anchors:
            fail("keep", f"must be in [0, pooled_anchors={self.pooled_anchors}]")
        for name in ("eps", "sigma_t"):
            if not (getattr(self, name) > 0 and math.isfinite(getattr(self, name))):
                fail(name, "must be a positive finite number")
        for name in ("beta", "lam"):
            if not (getattr(self, name) >= 0 and math.isfinite(getattr(self, name))):
                fail(name, "must be a non-negative finite number")
        if not 0.0 <= self.alpha <= 1.0:
            fail("alpha", "must be in [0, 1]")
        if self.sinkhorn not in SINKHORN_SOLVERS:
            fail("sinkhorn", f"must be one of {SINKHORN_SOLVERS}")
        if not (self.sinkhorn_tol >= 0 and math.isfinite(self.sinkhorn_tol)):
            fail("sinkhorn_tol", "must be a non-negative finite number")
        if self.sinkhorn == "reference" and self.max_cost / self.eps > PLAIN_DOMAIN_MAX_EXPONENT:
            fail("eps", f"the plain-domain 'reference' solver needs max cost / eps <= {PLAIN_DOMAIN_MAX_EXPONENT:g} "
                        f"(here {self.max_cost:.3f} / {self.eps:g}), or its fp32 kernel underflows; "
                        "use sinkhorn='fixed' (log domain)")

    # ---- derived quantities -------------------------------------------------------------------------------
    @property
    def tokens_per_frame(self) -> int:
        return self.grid * self.grid

    @property
    def pooled_grid(self) -> int:
        # LLaVA-OneVision interpolates to ceil(G/2); LLaVA-Video's avg_pool2d floors.
        if self.pool_mode == "bilinear":
            return math.ceil(self.grid / self.pool)
        return self.grid // self.pool

    @property
    def cells_per_frame(self) -> int:
        return self.pooled_grid ** 2

    @property
    def local_per_window(self) -> int:
        return math.floor(self.anchors * (1.0 - self.global_ratio)) // self.windows ** 2

    @property
    def global_anchors(self) -> int:
        return self.anchors - self.windows ** 2 * self.local_per_window

    @property
    def smallest_window(self) -> int:
        # Token row r lies in window row r*W//G; the smallest window is the product of the smallest spans.
        counts = [0] * self.windows
        for r in range(self.grid):
            counts[r * self.windows // self.grid] += 1
        return min(counts) ** 2

    @property
    def max_cost(self) -> float:
        """Largest transport cost: 1 - cos <= 2 plus beta times the grid diagonal (the inter-frame cost is < 2)."""
        return 2.0 + self.beta * math.sqrt(2.0)

    @property
    def clips(self) -> int:
        return self.frames // self.clip_len

    @property
    def inter_frame(self) -> bool:
        """Clips of one frame have nothing to merge: the inter-frame stage is off and frames pass through."""
        return self.clip_len > 1

    @property
    def tokens_per_clip(self) -> int:
        if not self.inter_frame:
            return self.pooled_anchors
        return 2 * self.pooled_anchors + (self.clip_len - 1) * self.keep

    @property
    def output_tokens(self) -> int:
        return self.clips * self.tokens_per_clip

    @property
    def input_tokens(self) -> int:
        """Visual tokens the LLM would receive without AOT (every pooled cell of every frame)."""
        return self.frames * self.cells_per_frame

    @property
    def retention(self) -> float:
        return self.output_tokens / self.input_tokens

    # ---- construction and serialisation ---------------------------------------------------------------------
    @classmethod
    def from_retention(cls, frames: int, retention: float, *, keep_ratio: float = 0.3,
                       anchors: int | None = None, **overrides: Any) -> "AOTConfig":
        """Solve `pooled_anchors`, `keep` (and `anchors` unless given) for a target retention.

        The largest `pooled_anchors` A with `keep = round(keep_ratio*A)` whose output does not exceed
        `retention` is chosen; `anchors` defaults to the per-frame token count whose share of the grid equals
        A's share of the pooled cells (anchors cover about the cells they are pooled into), at least one local
        anchor per window.
        """
        if not 0.0 < retention <= 1.0:
            raise ValueError(f"retention={retention!r}: must be in (0, 1]")
        if not 0.0 <= keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio={keep_ratio!r}: must be in [0, 1]")
        fixed = {k: v for k, v in overrides.items() if k not in ("pooled_anchors", "keep")}
        windows = fixed.get("windows", cls.windows)
        global_ratio = fixed.get("global_ratio", cls.global_ratio)
        # The fewest anchors that still give every window one local anchor.
        fewest = math.ceil(windows ** 2 / (1.0 - global_ratio)) if 0 <= global_ratio < 1 else 1
        probe = cls(frames=frames, anchors=anchors or fewest, pooled_anchors=1, keep=0, **fixed)
        solved = 0
        for a in range(1, probe.cells_per_frame + 1):
            candidate = dataclasses.replace(probe, pooled_anchors=a, keep=min(a, round(keep_ratio * a)))
            if candidate.retention > retention + 1e-12:
                break
            solved = a
        if solved == 0:
            raise ValueError(f"retention={retention!r}: too low for frames={frames}; one cell per frame already "
                             f"gives {probe.retention:.4f}")
        if anchors is None:
            covering = round(solved * probe.tokens_per_frame / probe.cells_per_frame)
            anchors = min(max(fewest, covering), probe.tokens_per_frame - 1)
        return dataclasses.replace(probe, anchors=anchors, pooled_anchors=solved,
                                   keep=min(solved, round(keep_ratio * solved)))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AOTConfig":
        """A new config (`export --config`): the fields it leaves out take today's defaults."""
        if not isinstance(data, dict):
            raise ValueError(f"AOTConfig: a config is a JSON object of fields, e.g. {{\"frames\": 8}}, not a "
                             f"{type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(map(str, set(data) - known))
        if unknown:
            raise ValueError(f"AOTConfig: unknown field(s) {unknown}")
        return cls(**data)

    @classmethod
    def from_recorded(cls, data: dict[str, Any]) -> "AOTConfig":
        """A config a manifest recorded. A manifest records every field it knew, so one it lacks did not exist when
        it was written: it takes the value that export was built with (`LEGACY_VALUES`), not today's default."""
        if not isinstance(data, dict):
            return cls.from_dict(data)
        return cls.from_dict({**LEGACY_VALUES, **data})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "AOTConfig":
        return cls.from_dict(json.loads(text))

    @property
    def hash(self) -> str:
        """Fields at their legacy value are left out, so a config that could be written before they existed keeps
        its hash (engine sidecars of older exports record it)."""
        data = {k: v for k, v in self.to_dict().items() if k not in LEGACY_VALUES or v != LEGACY_VALUES[k]}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
