"""EDM / variance-exploding models: deis_jax against EDM's Heun sampler on the Gaussian mixture of accuracy.py.

Method
------
* Problem: the mixture of `benchmarks/accuracy.py` (its `Problem`: 12 components in 12 dims, sharp modes, and the
  exact eps `eps_of_y`) in VE form, x = x0 + sigma eps on [sigma_min, sigma_max] = [0.002, 80] (EDM's defaults).
  VE and VP are one ODE: rho = sigma and x_VE = x_VP sqrt(1 + sigma^2) = y, the variable accuracy.py integrates,
  so its exact DOP853 solution (rtol 1e-10) applies unchanged, started from x_VE = 80 noise (in VP form
  80 noise / sqrt(1 + 80^2)).
* Model: the exact denoiser D(x, sigma) = x - sigma eps(x, sigma), given sigma (k-diffusion's convention).
* Every sampler starts from x_T = 80 noise (noise ~ N(0, I), batch 128) and is scored at sigma = 0, against
  the exact solution there; a sampler that stops at sigma_min (final_sigmas_type="sigma_min") keeps its
  residual noise, which counts as error. Error: mean over samples of |x - x_exact| / |x_exact| (accuracy.py's).
* EDM Heun: Algorithm 1 of Karras et al. (2022), deterministic (S_churn = 0): the Karras grid (rho = 7) of N
  levels from sigma_max to sigma_min, then t_N = 0; Heun steps, the last one (to 0) Euler. NFE = 2N - 1: at an
  NFE budget it takes the largest N that fits (one evaluation fewer than an even budget), and the next N
  (one more) is shown too.
* deis_jax VE form: DEISConfig(time_schedule="ve", prediction_type="sample"), the default Karras grid; every
  solver type and order, algorithm_type "deis" and "data_prediction", final_sigmas_type "sigma_min" and "zero"
  (EDM's grid: N levels, then 0), lower_order_final True and False (multistep, order >= 2). rhoRK takes as
  many steps as fit the NFE (with "zero": (N - 1) order + 1 evaluations).
* deis_jax VP form: the same ODE with the continuous vp_linear schedule on the same range (t_min = t(0.002),
  t_max = t(80)), started from x_VP = x_VE / sqrt(1 + 80^2), on the time grids VP models use (uniform in t,
  in sqrt(t), in log rho), the same solver options. (On the Karras grid the VP form equals the VE form:
  tests/test_ve.py.)
* Selection: at each NFE, the lowest-error configuration of each form on the training seed (mixture and
  noise seed 0, `--train-seed`); reported on held-out seeds (fresh mixtures and noise): the median error and
  the ratio deis_jax / Heun as median [min, max] over those seeds.

Run:  python benchmarks/ve_edm.py [--quick] [--heldout 5] [--out-md benchmarks/ve_edm_results.md]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]  # this checkout's deis_jax, and accuracy.py

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from accuracy import ORDERS, Problem, eps_of_y  # noqa: E402

import deis_jax as dj  # noqa: E402
from deis_jax import DEISConfig, schedule  # noqa: E402

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
NFES = (5, 10, 20)
TARGET_NFES = (10, 20)  # target: deis_jax at most 0.5x Heun's error
VE = DEISConfig(time_schedule="ve", sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, prediction_type="sample")
_T_RANGE = schedule.continuous_t(DEISConfig(time_schedule="vp_linear"), np.array([SIGMA_MIN, SIGMA_MAX]))
VP = DEISConfig(time_schedule="vp_linear", t_min=float(_T_RANGE[0]), t_max=float(_T_RANGE[1]),
                prediction_type="sample")
VP_GRIDS = {"linspace": {}, "quadratic": {"timestep_spacing": "quadratic"}, "exp": {"use_exponential_sigmas": True}}


class VEProblem(Problem):
    """accuracy.Problem started at x_VE = sigma_max noise (its x_T is that point in VP form), scored at sigma = 0."""

    def __init__(self, components=12, dim=12, seed=0, batch=128):
        super().__init__(components, dim, seed, batch)
        self.noise = self.x_T
        self.x_T = self.noise * SIGMA_MAX / math.sqrt(1 + SIGMA_MAX**2)
        self.reference = self.exact(SIGMA_MAX, 0.0)  # x_VE = x_VP at sigma = 0
        self.ve_model = jax.jit(lambda x, t: x - t * eps_of_y(self.mix, x, t, xp=jnp))

        def vp_model(x, t):  # x0 from x_VP: y = x_VP sqrt(1 + rho^2) = x_VE
            rho = schedule.continuous_rho(VP, t, xp=jnp)
            y = x * jnp.sqrt(1 + rho * rho)
            return y - rho * eps_of_y(self.mix, y, rho, xp=jnp)
        self.vp_model = jax.jit(vp_model)

    def denoise(self, x: np.ndarray, sigma: float) -> np.ndarray:
        """D(x, sigma) in numpy float64 (EDM Heun)."""
        return x - sigma * eps_of_y(self.mix, x, sigma)

    def error_at_zero(self, x: np.ndarray) -> float:
        ref = self.reference
        return float(np.mean(np.linalg.norm(x - ref, axis=1) / np.linalg.norm(ref, axis=1)))


# ----------------------------------------------------------------------------- samplers


def edm_sigmas(n: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = 7.0) -> np.ndarray:
    """EDM eq. 5: t_i = (sigma_max^(1/rho) + i / (n - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, i < n."""
    ramp = np.arange(n) / max(n - 1, 1)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def edm_heun(denoise, noise: np.ndarray, n: int) -> np.ndarray:
    """EDM Algorithm 1, deterministic: x_0 = t_0 noise; d_i = (x_i - D(x_i, t_i)) / t_i; an Euler step to
    t_{i+1}, then, unless t_{i+1} = 0, the trapezoidal correction with d' at t_{i+1}. 2n - 1 evaluations."""
    t = np.append(edm_sigmas(n), 0.0)
    x = noise * t[0]
    for i in range(n):
        d = (x - denoise(x, t[i])) / t[i]
        x_next = x + (t[i + 1] - t[i]) * d
        if t[i + 1] > 0:
            d_next = (x_next - denoise(x_next, t[i + 1])) / t[i + 1]
            x_next = x + (t[i + 1] - t[i]) * (0.5 * d + 0.5 * d_next)
        x = x_next
    return x


def heun_steps(nfe: int) -> int:
    """The largest N with 2N - 1 <= nfe."""
    return (nfe + 1) // 2


@dataclasses.dataclass(frozen=True)
class Candidate:
    form: str  # "VE" or "VP"
    name: str
    config: DEISConfig


def candidates(quick: bool) -> list[Candidate]:
    """Every solver type and order x algorithm type x final sigma x lower_order_final, on VE's Karras grid
    and on the VP grids."""
    out = []
    for form, grids in (("VE", {"karras": {}}), ("VP", VP_GRIDS)):
        base = VE if form == "VE" else VP
        for grid, grid_kw in grids.items():
            for solver_type, orders in ORDERS.items():
                for order in orders:
                    lofs = (True, False) if order >= 2 and solver_type != "rhork" else (True,)
                    for algorithm in ("deis", "data_prediction"):
                        for final in ("sigma_min", "zero"):
                            for lof in lofs:
                                name = (f"{solver_type} o{order} {grid}" + (" data" if algorithm != "deis" else "")
                                        + (" zero" if final == "zero" else "") + ("" if lof else " lof=F"))
                                config = dataclasses.replace(
                                    base, solver_type=solver_type, solver_order=order, algorithm_type=algorithm,
                                    final_sigmas_type=final, lower_order_final=lof, **grid_kw)
                                out.append(Candidate(form, name, config))
    if quick:
        keep = {"logrho o3 karras", "ipndm o4 karras zero", "tab o4 karras data", "rhork o2 karras zero",
                "ipndm o4 quadratic", "logrho o3 exp zero"}
        out = [c for c in out if c.name in keep]
    return out


def deis_steps(config: DEISConfig, nfe: int) -> int:
    """Solver steps within nfe evaluations: nfe, or for rhork nfe // order ((nfe - 1) // order + 1 with a final
    step to 0, which is one evaluation)."""
    if config.solver_type != "rhork":
        return nfe
    k = config.solver_order
    return (nfe - 1) // k + 1 if config.final_sigmas_type == "zero" else nfe // k


def run_deis(problem: VEProblem, c: Candidate, nfe: int):
    """(x_VE at the end, real NFE) of deis_jax in float64, or None when no step fits. The loop is eager `dj.step`
    calls with a jitted model, as in accuracy.py (the test checks it equals `sample_from_noise`)."""
    steps = deis_steps(c.config, nfe)
    if steps < 1:
        return None
    with jax.enable_x64(True):
        start = problem.noise if c.form == "VE" else problem.x_T
        model = problem.ve_model if c.form == "VE" else problem.vp_model
        state = dj.set_timesteps(c.config, steps, start.shape, dtype=jnp.float64)
        x = jnp.asarray(start) * state.init_noise_sigma  # VE: sigma_max noise; VP: the VP-form start
        for t in state.timesteps:
            x, state = dj.step(state, model(x, t), t, x)
        end = float(state.sigmas[-1])
        x = np.asarray(x) * (math.sqrt(1 + end * end) if c.form == "VP" else 1.0)  # x_VE = x_VP sqrt(1 + s^2)
        return x, int(state.timesteps.shape[0])


# ----------------------------------------------------------------------------- the study


def evaluate(problem: VEProblem, cands, nfes, log=print) -> dict:
    """{candidate name: {nfe: (error, real NFE)}} on one problem, EDM Heun included ("EDM Heun", "EDM Heun +1")."""
    results: dict = {}
    for label, extra in (("EDM Heun", 0), ("EDM Heun +1", 1)):
        results[label] = {}
        for nfe in nfes:
            n = heun_steps(nfe) + extra
            results[label][nfe] = (problem.error_at_zero(edm_heun(problem.denoise, problem.noise, n)), 2 * n - 1)
    for c in cands:
        results[c.name] = {}
        for nfe in nfes:
            out = run_deis(problem, c, nfe)
            if out is not None:
                results[c.name][nfe] = (problem.error_at_zero(out[0]), out[1])
        log(f"  {c.form} {c.name:30s} " + " ".join(f"{results[c.name][n][0]:.2e}" if n in results[c.name]
                                                   else "   -    " for n in nfes))
    return results


def select(results: dict, cands, nfes) -> dict:
    """{(form, nfe): name}: the lowest training error among configurations of that form using <= nfe evaluations."""
    best = {}
    for form in ("VE", "VP"):
        for nfe in nfes:
            scored = [(results[c.name][nfe][0], c.name) for c in cands
                      if c.form == form and nfe in results[c.name] and math.isfinite(results[c.name][nfe][0])]
            best[form, nfe] = min(scored)[1]
    return best


def held_out(args, cands, best, nfes, seeds, log=print) -> dict:
    """{seed: {name: {nfe: (error, real NFE)}}} of Heun and the selected configurations on held-out problems."""
    chosen = {name for name in best.values()}
    out = {}
    for seed in seeds:
        problem = VEProblem(args.components, args.dim, seed, args.batch)
        out[seed] = evaluate(problem, [c for c in cands if c.name in chosen], nfes, log=lambda *_: None)
        log(f"  held-out seed {seed}: " + ", ".join(
            f"NFE {n}: Heun {out[seed]['EDM Heun'][n][0]:.2e} VE {out[seed][best['VE', n]][n][0]:.2e}" for n in nfes))
    return out


def spread(values) -> str:
    v = np.asarray(values)
    return f"{np.median(v):.3f} [{v.min():.3f}, {v.max():.3f}]"


def markdown(args, train, best, held, nfes, cands, wall) -> str:
    seeds = sorted(held)
    med = lambda name, n: float(np.median([held[s][name][n][0] for s in seeds]))  # noqa: E731
    real = lambda name, n: held[seeds[0]][name][n][1]  # noqa: E731
    ratio = lambda name, ref, n: spread([held[s][name][n][0] / held[s][ref][n][0] for s in seeds])  # noqa: E731
    lines = [
        "# EDM / variance-exploding models: deis_jax vs EDM's Heun sampler",
        "",
        f"`python benchmarks/ve_edm.py{' --quick' if args.quick else ''}` ({time.strftime('%Y-%m-%d')}, "
        f"{platform.processor() or platform.machine()}, jax {jax.__version__}), wall time {wall:.0f} s.",
        "",
        f"The Gaussian mixture of `benchmarks/accuracy.py` ({args.components} components in {args.dim} dims, stds "
        f"in [0.04, 0.25]) in VE form, x = x0 + sigma eps on [0.002, 80]; exact denoiser D(x, sigma) given sigma; "
        f"batch {args.batch} of x_T = 80 noise; float64. Error: mean over samples of |x - x_exact| / |x_exact| at "
        "**sigma = 0** (samplers that stop at sigma_min = 0.002 keep its residual noise). deis_jax configurations "
        f"selected on training seed {args.train_seed}, reported on held-out seeds {', '.join(map(str, seeds))} "
        "(fresh mixtures and noise): median error, and the ratio to Heun's error as median [min, max] over them. "
        "See the module docstring for the method.",
        "",
        "| NFE | EDM Heun | EDM Heun, N + 1 | deis_jax VE (Karras grid) | error | deis_jax VP form | error "
        "| VE / Heun | VE / (Heun, N + 1) | VP form / Heun |",
        "|---:|---:|---:|---|---:|---|---:|---:|---:|---:|",
    ]
    for n in nfes:
        ve, vp = best["VE", n], best["VP", n]
        lines.append(
            f"| {n} | {med('EDM Heun', n):.2e} [{real('EDM Heun', n)}] | {med('EDM Heun +1', n):.2e} "
            f"[{real('EDM Heun +1', n)}] | {ve} [{real(ve, n)}] | {med(ve, n):.2e} | {vp} [{real(vp, n)}] | "
            f"{med(vp, n):.2e} | {ratio(ve, 'EDM Heun', n)} | {ratio(ve, 'EDM Heun +1', n)} | "
            f"{ratio(vp, 'EDM Heun', n)} |")
    lines += ["", "[k]: evaluations used. Heun uses 2N - 1 evaluations: N + 1 is one more than the NFE column.", "",
              "Target (deis_jax at most 0.5x Heun's error at NFE 10 and 20, held-out seeds):"]
    for n in TARGET_NFES:
        if n in nfes:
            worst = max(held[s][best["VE", n]][n][0] / held[s]["EDM Heun"][n][0] for s in seeds)
            lines.append(f"* NFE {n}: worst held-out ratio {worst:.3f} -> {'met' if worst <= 0.5 else 'NOT met'}")
    lines += ["", f"## Every configuration on the training seed ({args.train_seed})", "",
              "Error at sigma = 0; [k] where fewer evaluations than the column fit (rhoRK, Heun). `data`: "
              "algorithm_type='data_prediction'; `zero`: final_sigmas_type='zero'; `lof=F`: lower_order_final=False.",
              "", "| form | configuration | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
              "|---|---|" + "---:|" * len(nfes)]
    forms = {c.name: c.form for c in cands}
    for name, r in train.items():
        cells = [(f"{r[n][0]:.2e}" + (f" [{r[n][1]}]" if r[n][1] != n else "")) if n in r else "-" for n in nfes]
        lines.append(f"| {forms.get(name, 'EDM')} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a few configurations, 2 held-out seeds (smoke test)")
    p.add_argument("--components", type=int, default=12)
    p.add_argument("--dim", type=int, default=12)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--train-seed", type=int, default=0)
    p.add_argument("--heldout", type=int, default=5, help="number of held-out seeds (train seed + 1, ...)")
    p.add_argument("--out-md", default=os.path.join(HERE, "ve_edm_results.md"))
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    cands = candidates(args.quick)
    heldout = 2 if args.quick else args.heldout
    print(f"{len(cands)} deis_jax configurations x NFE {NFES}; training seed {args.train_seed}")
    train = evaluate(VEProblem(args.components, args.dim, args.train_seed, args.batch), cands, NFES)
    best = select(train, cands, NFES)
    print("held-out seeds:")
    held = held_out(args, cands, best, NFES, range(args.train_seed + 1, args.train_seed + 1 + heldout))
    wall = time.perf_counter() - t0
    md = markdown(args, train, best, held, NFES, cands, wall)
    with open(args.out_md, "w") as f:
        f.write(md)
    print(md.split("## Every configuration")[0])
    print(f"wrote {args.out_md} in {wall:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
