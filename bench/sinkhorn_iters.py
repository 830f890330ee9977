"""The Sinkhorn against the authors' stopping rule: iterations per call, fixed counts, and the static solver
that reproduces the rule (plain vs log domain).

The target is `reference_aot` (float64) with every data-dependent rule set to the static reducer's except the
stopping (`Rules(global_count=False, cell_threshold=False, distinct_quantile=False)`): the authors' Sinkhorn —
one intra-frame call for all 32 frames stopped together when the mean |r - r_prev| over all their source rows is
< 1e-2, one call per inter-frame step stopped on its own, at most 100 iterations — inside the static reducer's
layout, so that outputs compare position by position. Figures per run: index agreement (share of output positions
with the same (frame, row, col)), max relative error ‖static − ref‖ / ‖ref‖ and min cosine over positions that
agree.

1. Iterations per call of the authors' rule (the full authors' reference), both videos × four configs.
2. Default config: `AOTReducer` with `sinkhorn="fixed"` at n = 1..30 iterations, and with the solver that follows
   the rule (`sinkhorn="reference"`, plain domain) and its log-domain twin (this script only); solver time on the
   intra-frame call ([32, 729, 126]), best of 3.
3. Both solvers (fixed n = `AOTConfig().sinkhorn_iters`, reference) on both videos × four configs.

    python bench/sinkhorn_iters.py
    python bench/sinkhorn_iters.py --timing-only      # the solver times of part 2 alone (for a quiet moment)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch
from torch import Tensor

from aot_export import AOTConfig, AOTReducer
from aot_export.reducer import NO_MASS, intra_frame_transport, mask_indices, stopping_sinkhorn
from aot_export.reference import Rules, reference_aot

sys.path.insert(0, str(Path(__file__).parent))
from agreement import configs  # noqa: E402
from common import best_time, shared_videos, video_inputs  # noqa: E402

FRAMES = 32
HIDDEN = 896
COUNTS = range(1, 31)
AUTHORS_STOPPING = Rules(global_count=False, cell_threshold=False, distinct_quantile=False)


def log_stopping_sinkhorn(cost: Tensor, log_mu: Tensor, log_nu: Tensor, eps: float, tol: float, max_iters: int,
                          joint: bool) -> Tensor:
    """`reducer.stopping_sinkhorn` carried out on log r and log c (logsumexp passes), for the comparison only."""
    log_kernel = -cost / eps
    sources = (log_mu > NO_MASS / 2).to(cost.dtype)
    dims = (0, 1) if joint else (1,)
    per_source = 1.0 / sources.sum(dims, keepdim=True).clamp_min(1.0)
    log_r = torch.where(sources > 0, torch.zeros_like(log_mu), torch.full_like(log_mu, NO_MASS))
    log_c = torch.zeros_like(log_nu)
    running = torch.ones_like(per_source, dtype=torch.bool)
    for _ in range(max_iters):
        new_log_r = log_mu - torch.logsumexp(log_kernel + log_c.unsqueeze(1), dim=2)
        new_log_c = log_nu - torch.logsumexp(log_kernel + new_log_r.unsqueeze(2), dim=1)
        converged = (new_log_r.exp() - log_r.exp()).abs().sum(dims, keepdim=True) * per_source < tol
        log_r = torch.where(running, new_log_r, log_r)
        log_c = torch.where(running, new_log_c, log_c)
        running = running & ~converged
    return torch.exp(log_r.unsqueeze(2) + log_kernel + log_c.unsqueeze(1))


def log_domain_solver(cfg: AOTConfig):
    def solve(cost, log_mu, log_nu, *, joint):
        return log_stopping_sinkhorn(cost, log_mu, log_nu, cfg.eps, cfg.sinkhorn_tol, cfg.sinkhorn_max_iters, joint)
    return solve


def positionwise(tokens: Tensor, index: Tensor, ref) -> dict[str, float]:
    same = (index.long() == ref.index).all(-1)
    a, b = tokens.double()[same], ref.tokens[same]
    relative = (a - b).norm(dim=-1) / b.norm(dim=-1)
    return {"index_agreement": float(same.double().mean()), "max_relative_error": float(relative.max()),
            "cosine_min": float(torch.nn.functional.cosine_similarity(a, b, dim=-1).min())}


def intra_cost(cfg: AOTConfig, inputs) -> tuple[Tensor, Tensor, Tensor]:
    """The intra-frame call's (cost, log_mu, log_nu), captured from the reducer."""
    reducer = AOTReducer(cfg)
    anchor_mask, _ = reducer.select(*inputs[1:])
    captured = []

    def capture(cost, log_mu, log_nu, *, joint):
        captured.append((cost, log_mu, log_nu))
        return torch.zeros_like(cost)

    intra_frame_transport(cfg, inputs[0], mask_indices(anchor_mask, cfg.anchors), reducer.positions, capture)
    return captured[0]


@torch.inference_mode()
def solver_times(base: AOTConfig, inputs) -> dict[str, float]:
    """Milliseconds, best of 3, of each solver on the intra-frame call of `inputs` ([32, 729, 126])."""
    timed = intra_cost(dataclasses.replace(base, sinkhorn="reference"), inputs)
    fixed = AOTReducer(dataclasses.replace(base, sinkhorn="fixed")).sinkhorn
    times = {"reference, plain domain": best_time(lambda: stopping_sinkhorn(
                 *timed, base.eps, base.sinkhorn_tol, base.sinkhorn_max_iters, True)),
             "reference, log domain": best_time(lambda: log_stopping_sinkhorn(
                 *timed, base.eps, base.sinkhorn_tol, base.sinkhorn_max_iters, True)),
             f"fixed ({base.sinkhorn_iters} log-domain iterations)": best_time(lambda: fixed(*timed, joint=True))}
    for name, seconds in times.items():
        print(f"intra-frame solve, {name}: {1e3 * seconds:.1f} ms", flush=True)
    return {name: 1e3 * seconds for name, seconds in times.items()}


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timing-only", action="store_true", help="only the solver times of part 2")
    args = parser.parse_args()
    named = configs()
    base = named["default"]
    if args.timing_only:
        video = shared_videos()[0]
        print(f"{video.stem}, default config, torch {torch.__version__}, {torch.get_num_threads()} threads")
        print(json.dumps(solver_times(base, video_inputs(video, FRAMES, hidden=HIDDEN))))
        return
    inputs = {video.stem: video_inputs(video, FRAMES, hidden=HIDDEN) for video in shared_videos()}
    report: dict = {"iterations": [], "sweep": [], "solvers": []}

    print("1. iterations per call of the authors' rule (intra: the one call on all 32 frames; inter: every call)")
    for video, x in inputs.items():
        for name, cfg in named.items():
            ref = reference_aot(cfg, *x)
            inter = torch.tensor(ref.inter_iterations, dtype=torch.float64)
            row = {"video": video, "config": name, "intra": ref.intra_iterations, "inter_mean": float(inter.mean()),
                   "inter_median": float(inter.median()), "inter_max": int(inter.max()), "inter_calls": len(inter),
                   "calls_at_cap": int((inter >= 100).sum()) + int(ref.intra_iterations >= 100)}
            report["iterations"].append(row)
            print(f"{video:>13} {name:>8}: intra {row['intra']:>3}; inter mean {row['inter_mean']:.2f} median "
                  f"{row['inter_median']:.0f} max {row['inter_max']} over {row['inter_calls']} calls; calls that "
                  f"reached 100: {row['calls_at_cap']}", flush=True)

    print("2. default config against the authors' stopping: index agreement / max relative error / cos min")
    targets = {video: reference_aot(base, *x, rules=AUTHORS_STOPPING) for video, x in inputs.items()}
    for n in COUNTS:
        cfg = dataclasses.replace(base, sinkhorn="fixed", sinkhorn_iters=n)
        row = {"iters": n, **{v: positionwise(*AOTReducer(cfg)(*x), targets[v]) for v, x in inputs.items()}}
        report["sweep"].append(row)
        print(f"fixed n={n:>2}: " + "; ".join(f"{v} {row[v]['index_agreement']:.4f} {row[v]['max_relative_error']:.2e} "
                                            f"{row[v]['cosine_min']:.6f}" for v in inputs), flush=True)
    reference_cfg = dataclasses.replace(base, sinkhorn="reference")
    report["domains"] = {"solver_ms": solver_times(base, inputs[next(iter(inputs))])}
    domains = {"plain": None, "log": log_domain_solver(reference_cfg)}
    for domain, solver in domains.items():
        figures = {v: positionwise(*AOTReducer(reference_cfg, solver)(*x), targets[v]) for v, x in inputs.items()}
        report["domains"][domain] = figures
        print(f"reference solver, {domain} domain: " + "; ".join(
            f"{v} {f['index_agreement']:.4f} {f['max_relative_error']:.2e} {f['cosine_min']:.6f}"
            for v, f in figures.items()))

    print("3. both solvers, every config, against the authors' stopping")
    for video, x in inputs.items():
        for name, cfg in named.items():
            target = reference_aot(cfg, *x, rules=AUTHORS_STOPPING)
            for solver in ("fixed", "reference"):
                figures = positionwise(*AOTReducer(dataclasses.replace(cfg, sinkhorn=solver))(*x), target)
                report["solvers"].append({"video": video, "config": name, "solver": solver, **figures})
                print(f"{video:>13} {name:>8} {solver:>9}: index agreement {figures['index_agreement']:.4f}, max "
                      f"relative error {figures['max_relative_error']:.2e}, cos min {figures['cosine_min']:.6f}",
                      flush=True)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
