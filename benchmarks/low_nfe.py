"""Few-step sampling (3-20 model evaluations): deis_jax's hand and learned grids against diffusers, side by side.

Method
------
Five parts, each stored in one JSON file (`--out-json`) so that they can run one at a time (`--parts`, each
part replacing its stored result; --digits-rows runs part of the digits rows); the tables and the plot are
written from everything the JSON holds.

* mixture: the Gaussian mixture of `benchmarks/accuracy.py` (its `Problem`, exact eps-model and DOP853 exact
  solution, float64, 12 components in 12 dims), with a training noise batch (`--mix-train-seed`) and a
  held-out one (`--mix-test-seed`), 128 x_T each. Error = mean over samples of |x - x_exact| / |x_exact|,
  where x_exact is the exact ODE solution from the sampler's first sigma to sigma = 0 (x0 of the ODE, what a
  user gets as the image); every main row ends at sigma = 0. The final-step table also gives each
  configuration with final_sigmas_type="sigma_min", measured against the exact solution at sigma = 0 (its
  residual noise counts as error) and at its own end sigma(t = 0) = 0.01.
  * Hand grids: for every solver type and form (eps: algorithm_type="deis"; data:
    "data_prediction"), every order, grid (linspace, trailing, quadratic spacing; exponential, Karras, beta
    sigmas) and lower_order_final, with final_sigmas_type="zero", runs on the TRAINING noise at every NFE;
    the configuration with the lowest geometric-mean error over the NFEs is that (solver type, form)'s
    "best hand grid". Only those are evaluated on the held-out noise. rhoRK takes the most steps within
    the NFE (`accuracy.steps_for_nfe`: its step to 0 is one evaluation).
  * Learned grid: `deis_jax.optimize_sigmas` on the training noise for the best hand configuration (lowest
    training score of the selected ones), one grid per NFE, evaluated on the held-out noise.
* select: the digits' hand grids, chosen as on the mixture (same candidates, same geometric mean over the
  NFEs) by the RMS pixel distance to the ODE reference below, on `--select-samples` samples of the digits'
  training noise (`--digits-train-seed`). (The mixture's choices do not transfer: its sharp modes favour
  the quadratic grid, which on digits gives FID 100-370 at NFE 3-5.)
* learn: learned grids for the digits model (the best selected digits configuration that optimize_sigmas
  takes; training noise `--digits-train-seed`, `--learn-batch` samples), at `--digits-learn-nfe`; the
  training time of each grid is reported.
* digits: FID exactly as `benchmarks/digits_fid.py` (its real digits, classifier embedder, Frechet distance;
  samples clipped to [-1, 1] first), `--num-samples` samples per cell from held-out noise
  (`digits_fid.initial_noise(--seed)`, the noise of digits_fid's tables), with a bootstrap spread: the
  FID of `--bootstrap` resamples (with replacement) of the generated samples against the fixed real
  statistics, reported as the std. The same resampling indices for every cell, so two rows compare as a
  paired difference (its std decides "within spread"). Also the RMS distance to an ODE reference ending at
  sigma = 0 (rhoAB-3, exponential grid, 100 steps, final step to the denoised estimate) and overshoot (% of
  pixels |x| > 1.1 before clipping).
* guided: classifier guidance of the unconditional digits UNet with the bundled clean-image classifier
  applied to the denoised estimate (`guided_model`: x0_guided = x0_hat + scale sigma_t^2 grad log p(y | x0_hat)),
  logrho orders 2 and 3, linspace grid, final step to 0, eps form vs data-prediction form, at NFE 10 and 5
  and guidance scales 0 (unguided), 1, 2, 4, 6, 8;
  target class i % 10 for sample i. Reported: target-class accuracy of the guiding classifier and of an
  independent judge (sklearn logistic regression on pixels), FID against all real digits (the targets are
  balanced, as the real digits are), overshoot and the number of non-finite samples (metrics use the
  finite ones).

The digits part also shows deis_jax configured as DPM-Solver++ (`counterpart_rows`: data-prediction logrho of
orders 2 and 3 on linspace and Karras), left out of the targets.

diffusers contenders (`diffusers_rows`): DPMSolverMultistepScheduler (dpmsolver++, orders 2 and 3,
final_sigmas_type="zero", default linspace and Karras grids), UniPCMultistepScheduler (bh2, orders 2 and 3,
its defaults: linspace, final step to 0) and DDIMScheduler (leading = its default, and trailing spacing;
set_alpha_to_one=True; clip_sample=False, as no other row clips x0; it steps from t to t - 1000 // N, so it
ends at sigma = 0 except where that lands on t = 0 exactly: trailing at N = 6 and 15 ends at sigma(t=0) =
0.01). On the mixture they get the exact model in float64 (`accuracy.run_diffusers`); on digits they drive
the jitted JAX UNet from a Python loop, as `digits_fid.py` does.

Run:  python benchmarks/low_nfe.py [--quick] [--parts mixture select learn digits guided]
          [--out-json benchmarks/low_nfe_results.json] [--out-md benchmarks/low_nfe_results.md]
          [--out-png benchmarks/low_nfe.png]
(--quick: small sizes, no files unless asked.)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import sys
import tempfile
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

import accuracy as acc  # noqa: E402
import digits_fid as dfid  # noqa: E402

import deis_jax as dj  # noqa: E402
from deis_jax import DEISConfig, schedule  # noqa: E402

NFES = (3, 4, 5, 6, 8, 10, 15, 20)
QUICK_NFES = (3, 5, 10)
QUICK_SOLVER_TYPES = ("logrho", "ipndm", "rhork")
QUICK_DIFFUSERS = ("DPM-Solver++(2M) linspace", "UniPC bh2 o2", "DDIM leading")
BASE = DEISConfig()  # the schedule of the mixture model and of the digits UNet
FORMS = {"eps": "deis", "data": "data_prediction"}
GRIDS = {**acc.GRIDS, "beta": dict(use_beta_sigmas=True)}
HAND_GRIDS = ("linspace", "trailing", "quadratic", "exp", "karras", "beta")
GUIDANCE_SCALES = (0.0, 1.0, 2.0, 4.0, 6.0, 8.0)
GUIDED_NFES = (10, 5)
GUIDED_ORDERS = (2, 3)
# The digits ODE reference ending at sigma = 0: rhoAB-3 on an exponential grid (its last evaluation at t = 1),
# then the denoised estimate.
REFERENCE = DEISConfig(solver_type="rhoab", solver_order=3, use_exponential_sigmas=True, final_sigmas_type="zero")
REFERENCE_STEPS = 100


# ----------------------------------------------------------------------------- rows

@dataclasses.dataclass(frozen=True)
class Row:
    """A sampler of the tables. family: "deis_jax", "deis_jax learned" or "diffusers DPM++" / "UniPC" / "DDIM";
    kwargs: DEISConfig fields or the diffusers scheduler's keyword arguments (sorted items)."""

    family: str
    name: str
    kwargs: tuple

    @property
    def kw(self) -> dict:
        return dict(self.kwargs)

    @property
    def config(self) -> DEISConfig:
        return DEISConfig(**self.kw)

    @property
    def is_deis(self) -> bool:
        return self.family.startswith("deis_jax")

    def to_json(self) -> dict:
        return dict(family=self.family, name=self.name, kwargs=self.kw)

    @classmethod
    def from_json(cls, d: dict) -> Row:
        return cls(d["family"], d["name"], tuple(sorted(d["kwargs"].items())))


def deis_row(solver_type: str, order: int, grid: str, lower_order_final: bool, form: str, **extra) -> Row:
    kw = dict(solver_type=solver_type, solver_order=order, lower_order_final=lower_order_final,
              final_sigmas_type="zero", algorithm_type=FORMS[form], **GRIDS[grid])
    kw.update(extra)
    name = f"{solver_type} o{order} {grid}" + ("" if lower_order_final else " lof=F") + f" ({form})"
    return Row("deis_jax", name, tuple(sorted(kw.items())))


def hand_candidates(quick: bool) -> dict[tuple[str, str], list[Row]]:
    """{(solver_type, form): every hand-grid configuration with a final step to 0} (quick: a few)."""
    orders = {k: (2, 3) for k in QUICK_SOLVER_TYPES} if quick else acc.ORDERS
    grids = ("linspace", "exp", "karras") if quick else HAND_GRIDS
    out: dict = {}
    for form in FORMS:
        for solver_type, type_orders in orders.items():
            group = out.setdefault((solver_type, form), [])
            for order in type_orders:
                multistep = order >= 2 and solver_type != "rhork"
                for grid in grids:
                    for lof in ((True, False) if multistep and not quick else (True,)):
                        group.append(deis_row(solver_type, order, grid, lof, form))
    return out


def diffusers_rows(quick: bool = False) -> list[Row]:
    if not acc.HAVE_DIFFUSERS:
        return []
    rows = []
    for order in (2, 3):
        for grid, kw in (("linspace", {}), ("karras", dict(use_karras_sigmas=True))):
            rows.append(Row("diffusers DPM++", f"DPM-Solver++({order}M) {grid}", tuple(sorted(dict(
                algorithm_type="dpmsolver++", solver_order=order, final_sigmas_type="zero", **kw).items()))))
    for order in (2, 3):
        rows.append(Row("diffusers UniPC", f"UniPC bh2 o{order}", tuple(sorted(dict(
            solver_type="bh2", solver_order=order, final_sigmas_type="zero").items()))))
    for spacing in ("leading", "trailing"):
        rows.append(Row("diffusers DDIM", f"DDIM {spacing}", tuple(sorted(dict(
            timestep_spacing=spacing, set_alpha_to_one=True, clip_sample=False).items()))))
    return [r for r in rows if r.name in QUICK_DIFFUSERS] if quick else rows


COUNTERPART = "deis_jax counterpart"


def counterpart_rows() -> list[Row]:
    """deis_jax's data-prediction logrho DEIS of orders 2 and 3 on DPM-Solver++'s two grids (linspace, Karras),
    final step to 0: the rows of diffusers' DPM-Solver++(2M)/(3M) configured alike. Fixed in advance, not
    selected; shown for comparison and left out of the targets (`in_targets`)."""
    return [dataclasses.replace(deis_row("logrho", order, grid, True, "data"), family=COUNTERPART,
                                name=f"logrho o{order} {grid} (data), as DPM-Solver++({order}M)")
            for order in (2, 3) for grid in ("linspace", "karras")]


def in_targets(row: Row) -> bool:
    """A deis_jax row the targets count: the selected hand grids and the learned grid."""
    return row.is_deis and row.family != COUNTERPART


def make_scheduler(row: Row):
    from diffusers import DDIMScheduler

    cls = DDIMScheduler if row.family == "diffusers DDIM" else acc.SCHEDULERS[row.family]
    return cls(**row.kw)


# ----------------------------------------------------------------------------- mixture

def run_ddim_mixture(problem: acc.Problem, row: Row, nfe: int):
    """(x_0, [rho_start, rho_end], NFE) of diffusers' DDIM on the exact model (float64 samples).

    DDIM steps from t to t - num_train_timesteps // N (not to the next listed timestep): it ends at sigma = 0
    when that is below 0 (set_alpha_to_one), else at that timestep's sigma (e.g. trailing spacing at N = 6:
    166 -> 0, sigma(t=0) = 0.01)."""
    import torch

    sched = make_scheduler(row)
    sched.set_timesteps(nfe)
    x = torch.from_numpy(problem.x_T)
    for t in sched.timesteps:
        x = sched.step(torch.from_numpy(acc.model_np(problem.mix, x.numpy(), t)), t, x).prev_sample
    last = int(sched.timesteps[-1]) - sched.config.num_train_timesteps // nfe
    rho = lambda t: float(schedule.rho_at(BASE, float(t)))  # noqa: E731
    return x.numpy(), np.array([rho(sched.timesteps[0]), 0.0 if last < 0 else rho(last)]), len(sched.timesteps)


def deis_steps(config: DEISConfig, nfe: int) -> int | None:
    """`accuracy.steps_for_nfe`, or None (the cell is not run) where only the final step to 0 would fit: rhoRK
    with order >= NFE has no Runge-Kutta step, its one evaluation is the denoised estimate at x_T."""
    steps = acc.steps_for_nfe(config, nfe)
    return None if steps < 2 else steps


def run_mixture(problem: acc.Problem, row: Row, nfe: int, sigmas=None):
    """(x_0, sigmas, real NFE), or None for a cell not run (`deis_steps`): deis_jax (`accuracy.run_deis_jax`,
    optional custom grid) or diffusers."""
    if row.is_deis:
        if sigmas is None and deis_steps(row.config, nfe) is None:
            return None
        return acc.run_deis_jax(problem, row.config, nfe, sigmas=sigmas)
    if row.family == "diffusers DDIM":
        return run_ddim_mixture(problem, row, nfe)
    return acc.run_diffusers(problem, row, nfe)


def mixture_errors(problem: acc.Problem, row: Row, nfe: int, sigmas=None) -> dict:
    """{"zero": error vs the exact solution at sigma = 0, "own": at the sampler's own end, "nfe": real NFE}
    (nan errors and NFE 0 for a cell not run)."""
    out = run_mixture(problem, row, nfe, sigmas)
    if out is None:
        return dict(zero=math.nan, own=math.nan, nfe=0)
    x, s, real = out
    if not np.isfinite(x).all():
        return dict(zero=math.nan, own=math.nan, nfe=real)
    return dict(zero=problem.error(x, np.array([s[0], 0.0])), own=problem.error(x, s), nfe=real)


def geometric_mean(values) -> float:
    v = np.asarray(list(values), np.float64)
    return float(np.exp(np.mean(np.log(v)))) if np.all(np.isfinite(v) & (v > 0)) else math.inf


def select_hand_grids(error, candidates: dict, nfes, log=print) -> list[dict]:
    """For each (solver type, form): the candidate with the lowest geometric mean over nfes of error(row, nfe),
    its error on the training noise (nan for a cell not run, which rules the candidate out)."""
    out = []
    for (solver_type, form), rows in candidates.items():
        t0 = time.perf_counter()
        scored = sorted(((geometric_mean(error(r, n) for n in nfes), r) for r in rows), key=lambda e: e[0])
        (best_score, best), (second_score, second) = scored[0], scored[1] if len(scored) > 1 else (math.nan, None)
        out.append(dict(solver_type=solver_type, form=form, row=best.to_json(), train_score=best_score,
                        candidates=len(rows), runner_up=second.name if second else None, runner_up_score=second_score))
        log(f"  best {solver_type:6s} ({form}): {best.name:32s} train score {best_score:.3e}  of {len(rows)} "
            f"({time.perf_counter() - t0:.0f}s)", flush=True)
    return out


def learn_grid(model_fn, noise, row: Row, nfe: int, args, x64: bool) -> dict:
    """`deis_jax.optimize_sigmas` for row's config at nfe: {"sigmas", "seconds", "steps"}."""
    steps = acc.steps_for_nfe(row.config, nfe)
    t0 = time.perf_counter()
    with jax.enable_x64(x64):
        sigmas = dj.optimize_sigmas(model_fn, noise, config=row.config, num_inference_steps=steps,
                                    reference_steps=args.learn_reference_steps, train_steps=args.learn_train_steps,
                                    learning_rate=args.learn_lr, progress=False)
    return dict(sigmas=[float(s) for s in np.asarray(sigmas, np.float64)], seconds=time.perf_counter() - t0,
                steps=steps)


def have_learning() -> bool:
    return hasattr(dj, "optimize_sigmas")


def learnable(config: DEISConfig) -> bool:
    """Whether optimize_sigmas takes the config (on the discrete schedule: logrho only; the other solvers round a
    custom grid to training timesteps, so their loss has no gradient in the grid)."""
    from deis_jax.learn import check_learnable

    try:
        check_learnable(config)
    except ValueError:
        return False
    return True


def learned_row(selection: list[dict]) -> Row | None:
    """The selected configuration with the lowest training score among those optimize_sigmas takes."""
    rows = sorted(selection, key=lambda s: s["train_score"])
    return next((r for r in map(Row.from_json, (s["row"] for s in rows)) if learnable(r.config)), None)


def mixture_part(args, log=print) -> dict:
    nfes = args.nfes
    kw = dict(components=args.components, dim=args.dim, seed=args.mix_seed, batch=args.batch)
    train = acc.Problem(**kw, noise_seed=args.mix_train_seed)
    test = acc.Problem(**kw, noise_seed=args.mix_test_seed)
    log(f"mixture: selecting hand grids on the training noise (seed {args.mix_train_seed}), NFE {nfes}")
    selection = select_hand_grids(lambda r, n: mixture_errors(train, r, n)["zero"], hand_candidates(args.quick),
                                  nfes, log)
    selected = [Row.from_json(s["row"]) for s in selection]
    rows: dict = {}
    log(f"mixture: held-out noise (seed {args.mix_test_seed})")
    for row in diffusers_rows(args.quick) + selected:
        rows[row.name] = dict(row=row.to_json(), cells={str(n): mixture_errors(test, row, n) for n in nfes})
        log(f"  {row.name:34s} " + " ".join(f"{c['zero']:.2e}" for c in rows[row.name]["cells"].values()))
    final_step = {}
    for row in selected:
        twin = Row(row.family, row.name, tuple(sorted({**row.kw, "final_sigmas_type": "sigma_min"}.items())))
        final_step[row.name] = {str(n): mixture_errors(test, twin, n) for n in nfes}
    learned: dict = dict(available=have_learning())
    best = learned_row(selection) if have_learning() else None
    if best is not None:
        learned.update(row=best.to_json(), grids={})
        log(f"mixture: learning grids for {best.name} at NFE {args.learn_nfe}")
        for n in args.learn_nfe:
            with jax.enable_x64(True):
                grid = learn_grid(train.model_jax, jnp.asarray(train.x_T, jnp.float64), best, n, args, x64=True)
            grid.update(test=mixture_errors(test, best, n, grid["sigmas"]),
                        train=mixture_errors(train, best, n, grid["sigmas"]), **learn_settings(args))
            learned["grids"][str(n)] = grid
            log(f"  NFE {n}: held-out error {grid['test']['zero']:.3e} (training {grid['train']['zero']:.3e}), "
                f"trained in {grid['seconds']:.0f}s", flush=True)
    return dict(nfes=list(nfes), problem=kw, train_seed=args.mix_train_seed, test_seed=args.mix_test_seed,
                selection=selection, rows=rows, final_step=final_step, learned=learned)


# ----------------------------------------------------------------------------- digits

def guided_model(net, classifier, labels, scale):
    """Classifier guidance on the denoised estimate, for an eps-model `net(x, t)` on the DEISConfig() schedule:

        x0_hat     = (x - sigma_t eps(x, t)) / alpha_t,      g = grad_x0 log p(y | x0) at x0 = x0_hat,
        eps_guided = eps - scale * sigma_t * alpha_t * g,    i.e. x0_guided = x0_hat + scale * sigma_t^2 * g,

    p(y | .) the clean-image classifier's softmax (per sample). This is eps - scale * sigma_t *
    grad_x log p(y | x0_hat(x)) with the denoiser's Jacobian d x0_hat / dx = alpha_t Cov[x0 | x_t] / sigma_t^2
    (Tweedie) taken for unit-variance data, Cov = sigma_t^2 I, so d x0_hat / dx = alpha_t I. Backpropagating
    through the UNet instead divides its Jacobian's error by alpha_t (157 at t = 999): measured at NFE 10
    (logrho-2, scale 1, 100 samples) that made 88% of the pixels overshoot |x| > 1.1 (8% here) and reached
    25% target accuracy by the independent judge (47% here). scale = 0 is the plain model.
    """
    def fn(x, t):
        alpha, sigma = schedule.alpha_sigma(BASE, schedule.rho_at(BASE, t, xp=jnp))
        alpha, sigma = alpha.astype(x.dtype), sigma.astype(x.dtype)
        eps = net(x, t)
        log_p = lambda x0: jnp.take_along_axis(jax.nn.log_softmax(classifier(x0)), labels[:, None], axis=1).sum()  # noqa: E731
        return eps - scale * sigma * alpha * jax.grad(log_p)((x - sigma * eps) / alpha)

    return fn


def deis_generator(model, config: DEISConfig, steps: int | None, sigmas=None, classifier=None):
    """(noise, labels=None, scale=0) -> samples: one jitted `sample_from_noise` (guided when a classifier is
    given; labels and scale are traced, so one compilation serves every scale)."""
    from flax import nnx

    gm, sm = nnx.split(model)
    gc, sc = nnx.split(classifier) if classifier is not None else (None, None)

    @jax.jit
    def run(sm, sc, noise, labels, scale):
        net = nnx.merge(gm, sm)
        fn = (lambda x, t: net(x, t)) if classifier is None else guided_model(net, nnx.merge(gc, sc), labels, scale)
        return dj.sample_from_noise(fn, noise, config=config, num_inference_steps=None if sigmas else steps,
                                    sigmas=sigmas)

    return lambda noise, labels=None, scale=0.0: np.asarray(run(sm, sc, jnp.asarray(noise), labels, scale))


def diffusers_generator(model, row: Row, nfe: int):
    """noise -> samples: the diffusers scheduler's loop driving the jitted JAX UNet (numpy <-> torch each step)."""
    import torch
    from flax import nnx

    gm, sm = nnx.split(model)
    model_fn = jax.jit(lambda sm, x, t: nnx.merge(gm, sm)(x, t))

    def run(noise):
        sched = make_scheduler(row)
        sched.set_timesteps(nfe)
        x = torch.from_numpy(np.array(noise, np.float32)) * sched.init_noise_sigma
        for t in sched.timesteps:
            eps = model_fn(sm, jnp.asarray(sched.scale_model_input(x, t).numpy()), jnp.int32(int(t)))
            x = sched.step(torch.from_numpy(np.array(eps)), t, x).prev_sample
        return x.numpy()

    return run


def boot_indices(n: int, count: int, seed: int = 0) -> np.ndarray:
    """[count, n] resampling indices, the same for every cell of n samples (paired bootstrap)."""
    return np.random.default_rng(seed).integers(0, n, (count, n))


def measure(images, embed, real_stats, bootstrap: int, reference=None, labels=None, judge=None) -> dict:
    """Metrics of one cell on its finite samples (clipped to [-1, 1] as digits_fid does): FID and its bootstrap
    std (and the resampled FIDs, for paired comparisons), confidence, overshoot %, non-finite count, RMS to
    the reference, and with labels the target accuracy of the classifier and of `judge` (pixels -> class)."""
    finite = np.isfinite(images.reshape(len(images), -1)).all(axis=1)
    out: dict = dict(nonfinite=int((~finite).sum()))
    imgs = images[finite]
    if len(imgs) < 2:
        return dict(out, fid=math.nan, fid_sd=math.nan, boot=[])
    feats, probs = embed(np.clip(imgs, -1.0, 1.0))
    boot = [dfid.frechet_distance(*dfid.gaussian_stats(feats[i]), *real_stats)
            for i in boot_indices(len(imgs), bootstrap)]
    out.update(fid=dfid.frechet_distance(*dfid.gaussian_stats(feats), *real_stats), fid_sd=float(np.std(boot)),
               boot=boot, confidence=float(probs.max(1).mean()),
               out_of_range=100.0 * float((np.abs(imgs) > dfid.OUT_OF_RANGE).mean()))
    if reference is not None:
        out["rms"] = dfid.rms(imgs, reference[finite])
    if labels is not None:
        out["accuracy"] = float((probs.argmax(1) == labels[finite]).mean())
        out["judge_accuracy"] = float((judge(np.clip(imgs, -1.0, 1.0)) == labels[finite]).mean())
    return out


def load_models():
    from deis_jax.models.classifier import load_digits_classifier
    from deis_jax.models.unet import load_digits_unet

    return load_digits_unet(), load_digits_classifier()


def learn_part(args, selection: list[dict], previous: dict | None, log=print) -> dict:
    """Digits grids at --digits-learn-nfe, merged into those of an earlier run for the same configuration."""
    best = learned_row(selection) if have_learning() else None
    if best is None:
        log("learn: deis_jax.optimize_sigmas is not available or takes no selected configuration: skipped")
        return dict(available=False)
    from flax import nnx

    unet, _ = load_models()
    gm, sm = nnx.split(unet)
    noise = jnp.asarray(dfid.initial_noise(args.digits_train_seed, args.learn_batch))
    same = previous and previous.get("row") == best.to_json() and previous.get("seed") == args.digits_train_seed
    grids = dict(previous["grids"]) if same else {}
    for n in args.digits_learn_nfe:
        grid = learn_grid(lambda x, t: nnx.merge(gm, sm)(x, t), noise, best, n, args, x64=False)
        grids[str(n)] = dict(grid, batch=args.learn_batch, **learn_settings(args))
        log(f"learn: {best.name} NFE {n} trained in {grid['seconds']:.0f}s: "
            + " ".join(f"{s:.4g}" for s in grid["sigmas"]), flush=True)
    return dict(available=True, row=best.to_json(), grids=dict(sorted(grids.items(), key=lambda e: int(e[0]))),
                seed=args.digits_train_seed, merged=bool(same))


def row_group(row: Row) -> str:
    """diffusers, eps, data (the hand-grid deis_jax rows by form), learned or counterpart: the units of
    --digits-rows."""
    if not row.is_deis:
        return "diffusers"
    if row.family == "deis_jax learned":
        return "learned"
    if row.family == COUNTERPART:
        return "counterpart"
    return "data" if row.config.predicts_data else "eps"


def digits_reference(unet, noise, args) -> np.ndarray:
    """The ODE reference samples, cached in the temporary directory (the same for every --digits-rows run)."""
    path = os.path.join(tempfile.gettempdir(), f"low_nfe_reference_{args.seed}_{len(noise)}_{REFERENCE_STEPS}.npy")
    if os.path.exists(path):
        return np.load(path)
    reference = dfid.batched(deis_generator(unet, REFERENCE, REFERENCE_STEPS), args.batch_size, noise)
    np.save(path, reference)
    return reference


def select_part(args, log=print) -> dict:
    """The digits' hand grids: `select_hand_grids` by the RMS pixel distance to the ODE reference (solver error)
    on --select-samples samples of the training noise (digits_fid.initial_noise(--digits-train-seed)). The
    loop is `dj.step` called eagerly with the jitted UNet (no compilation per candidate)."""
    from flax import nnx

    unet, _ = load_models()
    gm, sm = nnx.split(unet)
    model = jax.jit(lambda sm, x, t: nnx.merge(gm, sm)(x, t))
    noise = dfid.initial_noise(args.digits_train_seed, args.select_samples)
    reference = deis_generator(unet, REFERENCE, REFERENCE_STEPS)(noise)

    def error(row: Row, nfe: int) -> float:
        steps = deis_steps(row.config, nfe)
        if steps is None:
            return math.nan
        x = jnp.asarray(noise)
        state = dj.set_timesteps(row.config, steps, x.shape)
        for t in state.timesteps:
            x, state = dj.step(state, model(sm, x, t), t, x)
        x = np.asarray(x)
        return dfid.rms(x, reference) if np.isfinite(x).all() else math.nan

    log(f"select: digits hand grids by RMS to the ODE reference, {args.select_samples} training samples "
        f"(seed {args.digits_train_seed}), NFE {args.nfes}")
    return dict(selection=select_hand_grids(error, hand_candidates(args.quick), args.nfes, log),
                samples=args.select_samples, seed=args.digits_train_seed, nfes=list(args.nfes))


def digits_part(args, selection: list[dict], learned: dict | None, previous: dict | None, log=print) -> dict:
    """FID cells of the --digits-rows groups; rows of the other groups are kept from an earlier run with the same
    NFEs, samples and noise."""
    unet, classifier = load_models()
    real, _ = dfid.real_digits()
    embed = dfid.make_embedder(classifier, args.batch_size)
    real_feats = embed(real)[0]
    real_stats = dfid.gaussian_stats(real_feats)
    noise = dfid.initial_noise(args.seed, args.num_samples)
    floor_mean, floor_std = dfid.split_half_fid(real_feats, args.seed)
    t0 = time.perf_counter()
    reference = digits_reference(unet, noise, args)
    refs = dict(floor_mean=floor_mean, floor_std=floor_std, reference_seconds=time.perf_counter() - t0,
                ode={k: v for k, v in measure(reference, embed, real_stats, args.bootstrap).items() if k != "boot"})
    log(f"digits: real vs real {refs['floor_mean']:.2f} +- {refs['floor_std']:.2f}; ODE reference FID "
        f"{refs['ode']['fid']:.2f} +- {refs['ode']['fid_sd']:.2f} ({refs['reference_seconds']:.0f}s)", flush=True)
    rows = diffusers_rows(args.quick) + [Row.from_json(s["row"]) for s in selection]
    rows += counterpart_rows()[:1] if args.quick else counterpart_rows()
    plan = [(row, n, None) for row in rows for n in args.nfes]
    if learned and learned.get("available"):
        best = Row.from_json(learned["row"])
        lrow = Row("deis_jax learned", f"learned {best.name}", best.kwargs)
        plan += [(lrow, int(n), g["sigmas"]) for n, g in learned["grids"].items() if int(n) in args.nfes]
    plan = [p for p in plan if row_group(p[0]) in args.digits_rows]
    setup = dict(nfes=list(args.nfes), num_samples=args.num_samples, seed=args.seed, bootstrap=args.bootstrap)
    keep = previous and all(previous.get(k) == v for k, v in setup.items())
    out: dict = {name: r for name, r in (previous["rows"].items() if keep else ())
                 if row_group(Row.from_json(r["row"])) not in args.digits_rows}
    for row, n, sigmas in plan:
        t0 = time.perf_counter()
        if row.is_deis and not sigmas and deis_steps(row.config, n) is None:
            continue
        if row.is_deis:
            steps, grid = (None, tuple(sigmas)) if sigmas else (deis_steps(row.config, n), None)
            gen = deis_generator(unet, row.config, steps, grid)
            real_nfe = dj.set_timesteps(row.config, steps, (1,), sigmas=grid).num_inference_steps
        else:
            gen, real_nfe = diffusers_generator(unet, row, n), n
        images = dfid.batched(gen, args.batch_size, noise)
        cell = measure(images, embed, real_stats, args.bootstrap, reference)
        cell.update(nfe=real_nfe, seconds=time.perf_counter() - t0)
        out.setdefault(row.name, dict(row=row.to_json(), cells={}))["cells"][str(n)] = cell
        log(f"  {row.name:40s} NFE {n:2d}{'' if real_nfe == n else f' ({real_nfe})'}: FID {cell['fid']:7.2f} +- "
            f"{cell['fid_sd']:.2f}  RMS {cell.get('rms', math.nan):.4f}  "
            f"|x|>1.1 {cell.get('out_of_range', math.nan):5.2f}%"
            f"  ({cell['seconds']:.0f}s)", flush=True)
    order = ("diffusers", "eps", "data", "learned", "counterpart")
    out = dict(sorted(out.items(), key=lambda e: order.index(row_group(Row.from_json(e[1]["row"])))))
    return dict(setup, refs=refs, rows=out, merged=bool(keep))


def pixel_judge(real, labels):
    """An independent judge of a digit's class: sklearn logistic regression on the 64 pixels, fitted on the
    training split of digits_fid.held_out_accuracy; returns (predict, held-out accuracy)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    flat = real.reshape(len(real), -1)
    tr, te = train_test_split(np.arange(len(labels)), test_size=0.2, stratify=labels, random_state=0)
    clf = LogisticRegression(max_iter=2000).fit(flat[tr], labels[tr])
    return (lambda x: clf.predict(x.reshape(len(x), -1))), float(clf.score(flat[te], labels[te]))


def guided_part(args, log=print) -> dict:
    unet, classifier = load_models()
    real, labels = dfid.real_digits()
    embed = dfid.make_embedder(classifier, args.batch_size)
    real_stats = dfid.gaussian_stats(embed(real)[0])
    judge, judge_accuracy = pixel_judge(real, labels)
    noise = dfid.initial_noise(args.guided_seed, args.guided_samples)
    targets = np.arange(args.guided_samples) % 10
    cells = []
    for order in args.guided_orders:
        for form in FORMS:
            row = deis_row("logrho", order, "linspace", True, form)
            for n in args.guided_nfes:
                gen = deis_generator(unet, row.config, n, classifier=classifier)
                for scale in args.guidance_scales:
                    t0 = time.perf_counter()
                    images = dfid.batched(lambda z, y, g=gen, s=scale: g(z, jnp.asarray(y), s), args.batch_size,
                                          noise, targets)
                    cell = measure(images, embed, real_stats, args.bootstrap, labels=targets, judge=judge)
                    cell.pop("boot")
                    cell = dict(order=order, form=form, nfe=n, scale=scale, name=row.name,
                                seconds=time.perf_counter() - t0, **cell)
                    cells.append(cell)
                    log(f"  guided logrho o{order} ({form}) NFE {n:2d} scale {scale:g}: accuracy "
                        f"{cell.get('accuracy', math.nan):.3f} (judge {cell.get('judge_accuracy', math.nan):.3f})  "
                        f"FID {cell['fid']:7.2f} +- {cell['fid_sd']:.2f}  |x|>1.1 "
                        f"{cell.get('out_of_range', math.nan):5.2f}%  non-finite {cell['nonfinite']}  "
                        f"({cell['seconds']:.0f}s)", flush=True)
    return dict(cells=cells, num_samples=args.guided_samples, seed=args.guided_seed, judge_accuracy=judge_accuracy)


# ----------------------------------------------------------------------------- analysis

def _finite(v) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def best_row(rows: dict, n: int, pick, key: str):
    """(name, cell) with the lowest cells[n][key] among rows whose row dict satisfies pick, or None."""
    cands = [(name, r["cells"][str(n)]) for name, r in rows.items()
             if pick(Row.from_json(r["row"])) and str(n) in r["cells"] and _finite(r["cells"][str(n)].get(key))]
    return min(cands, key=lambda e: e[1][key]) if cands else None


def mixture_targets(mix: dict) -> list[dict]:
    """Learned grid vs the best hand-grid deis_jax row (held-out error at sigma = 0), at every learned NFE."""
    out = []
    for n, g in mix["learned"].get("grids", {}).items():
        hand = best_row(mix["rows"], int(n), in_targets, "zero")
        if hand:
            out.append(dict(nfe=int(n), learned=g["test"]["zero"], hand=hand[1]["zero"], hand_name=hand[0],
                            ratio=g["test"]["zero"] / hand[1]["zero"]))
    return out


def compare(a: dict, b: dict) -> dict:
    """FID a - FID b ("diff"), the larger bootstrap std of the two ("spread", what each FID is reported with) and
    the std of the paired bootstrap difference ("paired_sd"; nan when the cells were not resampled alike)."""
    alike = len(a.get("boot", ())) and len(a["boot"]) == len(b.get("boot", ())) and not a["nonfinite"] + b["nonfinite"]
    return dict(diff=a["fid"] - b["fid"], spread=max(a["fid_sd"], b["fid_sd"]),
                paired_sd=float(np.std(np.subtract(a["boot"], b["boot"]))) if alike else math.nan)


def verdict(c: dict) -> str:
    """"At most equal" read as the issue does: below, or above by at most the FIDs' spread."""
    d, detail = c["diff"], f"FID sd {c['spread']:.2f}, paired sd {c['paired_sd']:.2f}"
    if d <= 0:
        return "met"
    if d <= c["spread"]:
        return f"met within spread (+{d:.2f}; {detail})"
    return f"MISSED by {d:.2f} ({detail})"


def digits_comparison(dig: dict) -> list[dict]:
    """At every NFE: the best deis_jax row (hand or learned) vs the best diffusers row, by FID."""
    out = []
    for n in dig["nfes"]:
        d = best_row(dig["rows"], n, in_targets, "fid")
        f = best_row(dig["rows"], n, lambda r: not r.is_deis, "fid")
        if d and f:
            out.append(dict(nfe=n, deis=d, diffusers=f, **compare(d[1], f[1])))
    return out


# ----------------------------------------------------------------------------- reporting

def fmt_err(c: dict, n) -> str:
    if c["nfe"] == 0:
        return "-"
    if not _finite(c.get("zero")):
        return "fails"
    return f"{c['zero']:.2e}" + (f" [{c['nfe']}]" if c["nfe"] != int(n) else "")


def fmt_fid(c: dict | None, n=None) -> str:
    if c is None:
        return "-"
    if not _finite(c.get("fid")):
        return "non-finite"
    text = f"{c['fid']:.2f} ± {c['fid_sd']:.2f}"
    return text + (f" [{c['nfe']}]" if n is not None and c.get("nfe", n) != n else "")


def selection_markdown(selection: list[dict], score: str) -> list[str]:
    lines = [f"Geometric mean over the NFEs of the {score}; each (solver type, form) chose among its orders x "
             "grids (linspace, trailing, quadratic; exponential, Karras, beta sigmas) x lower_order_final, all with "
             "final_sigmas_type=\"zero\" (a candidate that cannot run at some NFE is out: rhoRK of order >= 3 "
             "at NFE 3).", "", "| solver type | form | chosen | score | runner-up | score | candidates |",
             "|---|---|---|---:|---|---:|---:|"]
    for s in selection:
        lines.append(f"| {s['solver_type']} | {s['form']} | {Row.from_json(s['row']).name} | {s['train_score']:.3e} "
                     f"| {s['runner_up']} | {s['runner_up_score']:.3e} | {s['candidates']} |")
    return lines


def mixture_markdown(mix: dict) -> list[str]:
    nfes = mix["nfes"]
    head = nfe_head("row", nfes)
    lines = ["## Gaussian mixture: error against the exact ODE solution at sigma = 0 (held-out noise)", "",
             f"Mixture {mix['problem']}; hand grids selected on the training noise (seed {mix['train_seed']}), "
             f"everything below on the held-out noise (seed {mix['test_seed']}), float64. Mean relative error "
             "|x - x_exact| / |x_exact|, x_exact = the exact ODE solution at sigma = 0. [k]: the real NFE where "
             "below the column's (rhoRK).", "", head]
    for name, r in mix["rows"].items():
        lines.append(f"| {name} | " + " | ".join(fmt_err(r["cells"][str(n)], n) for n in nfes) + " |")
    lrn = mix["learned"]
    if lrn.get("grids"):
        lines.append(f"| **learned** {Row.from_json(lrn['row']).name} | " + " | ".join(
            fmt_err(lrn["grids"][str(n)]["test"], n) if str(n) in lrn["grids"] else "-" for n in nfes) + " |")
    lines += ["", "### Hand-grid selection (training noise)", ""] + selection_markdown(
        mix["selection"], "training error at sigma = 0")
    lines += ["", "### The final step: sigma_min vs zero (held-out noise)", "",
              "Each selected configuration with final_sigmas_type=\"sigma_min\" (ends at sigma(t=0) = 0.01): "
              "error against the exact solution at sigma = 0 / at its own end; then the same configuration with "
              "\"zero\" (its row above).", "", head]
    for name, cells in mix["final_step"].items():
        zero = mix["rows"][name]["cells"]
        lines.append(f"| {name} | " + " | ".join(
            f"{cells[str(n)]['zero']:.2e} / {cells[str(n)]['own']:.2e} / {zero[str(n)]['zero']:.2e}" for n in nfes)
            + " |")
    if lrn.get("grids"):
        lines += ["", "### Learned grids", "",
                  f"`deis_jax.optimize_sigmas` for {Row.from_json(lrn['row']).name} on the training noise; "
                  "error at sigma = 0 on the training and held-out noise, and the held-out error of the same "
                  "configuration on its hand grid (where the training starts).", "",
                  "| NFE | steps | train steps | reference steps | learning rate | training time | train error | "
                  "held-out error | hand grid, held-out | sigmas |", "|" + "---:|" * 9 + "---|"]
        own = mix["rows"][Row.from_json(lrn["row"]).name]["cells"]
        for n, g in lrn["grids"].items():
            lines.append(f"| {n} | {g['steps']} | {g['train_steps']} | {g['reference_steps']} | {g['learning_rate']:g} "
                         f"| {g['seconds']:.0f} s | {g['train']['zero']:.3e} | {g['test']['zero']:.3e} | "
                         f"{fmt_err(own[n], n) if n in own else '-'} | {' '.join(f'{s:.4g}' for s in g['sigmas'])} |")
    elif not lrn.get("available", True):
        lines += ["", "Learned grids: `deis_jax.optimize_sigmas` was not available in this run."]
    return lines


def digits_markdown(dig: dict, select: dict, learned: dict | None) -> list[str]:
    nfes, refs = dig["nfes"], dig["refs"]
    head = nfe_head("row", nfes)
    lines = ["## Digits: FID (± bootstrap std)", "",
             f"{dig['num_samples']} samples per cell from held-out noise (digits_fid.initial_noise({dig['seed']})), "
             f"FID as in benchmarks/digits_fid.py, ± the std of {dig['bootstrap']} bootstrap resamples of the "
             f"samples. Real vs real (split halves): {refs['floor_mean']:.2f} ± {refs['floor_std']:.2f}. ODE "
             f"reference (rhoAB-3, exponential grid, {REFERENCE_STEPS} steps, final step to 0): "
             f"{fmt_fid(refs['ode'])}. Hand grids: selected on the digits' training noise (below).", "", head]
    for name, r in dig["rows"].items():
        lines.append(f"| {name} | " + " | ".join(fmt_fid(r["cells"].get(str(n)), n) for n in nfes) + " |")
    lines += ["", "### Best deis_jax vs best diffusers (by FID, at each NFE)", "",
              "| NFE | best deis_jax | FID | best diffusers | FID | difference (paired bootstrap sd) | target |",
              "|---:|---|---:|---|---:|---:|---|"]
    for c in digits_comparison(dig):
        lines.append(f"| {c['nfe']} | {c['deis'][0]} | {fmt_fid(c['deis'][1])} | {c['diffusers'][0]} | "
                     f"{fmt_fid(c['diffusers'][1])} | {c['diff']:+.2f} ({c['paired_sd']:.2f}) | {verdict(c)} |")
    for title, key, f in (("RMS pixel distance to the ODE reference at sigma = 0 (solver error)", "rms", ".4f"),
                          ("% of pixels with |x| > 1.1 before clipping", "out_of_range", ".2f")):
        lines += ["", f"### {title}", "", head]
        for name, r in dig["rows"].items():
            lines.append(f"| {name} | " + " | ".join(
                format(r["cells"][str(n)][key], f) if str(n) in r["cells"] and key in r["cells"][str(n)] else "-"
                for n in nfes) + " |")
    lines += ["", "### Digits hand-grid selection (training noise)", "",
              f"RMS pixel distance to the ODE reference on {select['samples']} samples of "
              f"digits_fid.initial_noise({select['seed']}), the loop stepped eagerly.", ""] + selection_markdown(
        select["selection"], "RMS distance")
    if learned and learned.get("grids"):
        lines += ["", "### Learned digits grids", "",
                  f"`deis_jax.optimize_sigmas` for {Row.from_json(learned['row']).name} on training noise "
                  f"digits_fid.initial_noise({learned['seed']}) (batch = its first samples).", "",
                  "| NFE | steps | batch | train steps | reference steps | learning rate | training time | sigmas |",
                  "|---:|---:|---:|---:|---:|---:|---:|---|"]
        for n, g in learned["grids"].items():
            lines.append(f"| {n} | {g['steps']} | {g['batch']} | {g['train_steps']} | {g['reference_steps']} | "
                         f"{g['learning_rate']:g} | {g['seconds']:.0f} s | "
                         f"{' '.join(f'{s:.4g}' for s in g['sigmas'])} |")
    return lines


def guided_markdown(g: dict) -> list[str]:
    lines = ["## Guided digits: eps form vs data-prediction form", "",
             f"Classifier guidance on the denoised estimate (`guided_model`), {g['num_samples']} samples per cell "
             f"(noise seed {g['seed']}), target class i % 10. accuracy: the guiding classifier's; judge: sklearn "
             f"logistic regression on pixels ({g['judge_accuracy']:.3f} held-out accuracy on real digits), "
             "not used for guidance. FID against all real digits. Metrics over the finite samples.", "",
             "| sampler | NFE | scale | accuracy | judge | FID | |x|>1.1 % | non-finite |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for c in g["cells"]:
        acc_text = f"{c['accuracy']:.3f} | {c['judge_accuracy']:.3f}" if "accuracy" in c else "- | -"
        lines.append(f"| {c['name']} | {c['nfe']} | {c['scale']:g} | {acc_text} | {fmt_fid(c)} | "
                     f"{c.get('out_of_range', math.nan):.2f} | {c['nonfinite']} |")
    return lines


def targets_markdown(store: dict) -> list[str]:
    lines = ["## Targets", ""]
    mix, dig = store.get("mixture"), store.get("digits")
    if mix:
        for t in mixture_targets(mix):
            if t["nfe"] in (5, 10):
                lines.append(f"* Mixture, NFE {t['nfe']}: learned {t['learned']:.3e} vs best hand grid "
                             f"({t['hand_name']}) {t['hand']:.3e}: ratio {t['ratio']:.2f} (target <= 0.5): "
                             + ("met" if t["ratio"] <= 0.5 else "MISSED"))
        if not mix["learned"].get("grids"):
            lines.append("* Mixture learned-grid targets: not measured (no learned grids in this run).")
    if dig:
        for c in digits_comparison(dig):
            if 3 <= c["nfe"] <= 20:
                lines.append(f"* Digits NFE {c['nfe']}: best deis_jax {fmt_fid(c['deis'][1])} ({c['deis'][0]}) vs "
                             f"best diffusers {fmt_fid(c['diffusers'][1])} ({c['diffusers'][0]}): "
                             + verdict(c))
        d5 = best_row(dig["rows"], 5, in_targets, "fid")
        if d5:
            lines.append(f"* Digits NFE 5, best deis_jax FID {fmt_fid(d5[1])} (target <= 10): "
                         + ("met" if d5[1]["fid"] <= 10 else f"MISSED by {d5[1]['fid'] - 10:.2f}"))
        l5 = best_row(dig["rows"], 5, lambda r: r.family == "deis_jax learned", "fid")
        h8 = best_row(dig["rows"], 8, lambda r: r.family == "deis_jax", "fid")
        if l5 and h8:
            lines.append(f"* Digits: learned NFE 5 {fmt_fid(l5[1])} vs best hand grid NFE 8 {fmt_fid(h8[1])} "
                         f"({h8[0]}): " + verdict(compare(l5[1], h8[1])))
        elif not l5:
            lines.append("* Digits learned NFE 5 vs hand NFE 8: not measured (no learned digits grid in this run).")
    return lines


def nfe_head(label: str, nfes) -> str:
    """A markdown table head: `label`, then one right-aligned column per NFE."""
    return f"| {label} | " + " | ".join(f"NFE {n}" for n in nfes) + " |\n|---|" + "---:|" * len(nfes)


def header_markdown(title: str, script: str, meta: dict, runs) -> list[str]:
    """A results file's title, machine and versions, and a table of the runs (part, {command, date, wall})."""
    return [title, "", f"Made by `{script}` (method in its docstring). Machine: {platform.platform()}, "
            f"{os.cpu_count()} CPU cores shared with other work; {meta.get('versions', '')}.", "",
            "| part | command | date | wall time |", "|---|---|---|---:|"] + [
        f"| {part} | `{m['command']}` | {m['date']} | {m['wall']:.0f} s |" for part, m in runs]


def markdown(store: dict) -> str:
    meta = store.get("meta", {})
    runs = [(part, m) for part in PARTS for m in meta.get("parts", {}).get(part, [])]
    lines = header_markdown("# Few-step sampling: deis_jax hand and learned grids vs diffusers (NFE 3-20)",
                            "benchmarks/low_nfe.py", meta, runs)
    lines += [""] + targets_markdown(store)
    if "mixture" in store:
        lines += [""] + mixture_markdown(store["mixture"])
    if "digits" in store:
        lines += [""] + digits_markdown(store["digits"], store["select"], store.get("learn"))
    if "guided" in store:
        lines += [""] + guided_markdown(store["guided"])
    return "\n".join(lines) + "\n"


def plot(store: dict, path: str) -> None:
    """Mixture error and digits FID against NFE (every row faint; the best row of each camp at each NFE and the
    learned grid bold), and the guided FID against the guidance scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in ("mixture", "digits", "guided") if p in store]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5.2), squeeze=False)
    for ax, part in zip(axes[0], panels, strict=True):
        data = store[part]
        if part == "guided":
            for (order, form), marker in zip([(o, f) for o in sorted({c["order"] for c in data["cells"]})
                                              for f in FORMS], "osv^", strict=False):
                for n, ls in zip(GUIDED_NFES, ("-", "--"), strict=False):
                    pts = [(c["scale"], c["fid"]) for c in data["cells"]
                           if c["order"] == order and c["form"] == form and c["nfe"] == n and _finite(c["fid"])]
                    if pts:
                        ax.plot(*zip(*pts, strict=True), ls, marker=marker, label=f"logrho o{order} {form} NFE {n}")
            ax.set(xlabel="guidance scale", ylabel="FID", yscale="log", title="classifier-guided digits")
        else:
            key = "zero" if part == "mixture" else "fid"
            for r in data["rows"].values():
                row = Row.from_json(r["row"])
                if row.family != "deis_jax learned":
                    pts = sorted((int(n), c[key]) for n, c in r["cells"].items() if _finite(c.get(key)))
                    ax.plot(*zip(*pts, strict=True), "-" if row.is_deis else "--", lw=0.7, alpha=0.35,
                            color="tab:blue" if row.is_deis else "tab:red")
            for label, pick, style in (("best diffusers row", lambda r: not r.is_deis, dict(color="tab:red", ls="--")),
                                       ("best deis_jax hand grid", lambda r: r.family == "deis_jax",
                                        dict(color="tab:blue")),
                                       ("learned grid", lambda r: r.family == "deis_jax learned",
                                        dict(color="k", marker="*", ms=9))):
                pts = [(n, b[1][key]) for n in data["nfes"] if (b := best_row(data["rows"], n, pick, key))]
                if pts:
                    ax.plot(*zip(*pts, strict=True), lw=2.2, **{"marker": "o", "ms": 4, **style}, label=label)
            if part == "mixture" and data["learned"].get("grids"):
                pts = sorted((int(n), g["test"]["zero"]) for n, g in data["learned"]["grids"].items())
                ax.plot(*zip(*pts, strict=True), "k*-", lw=2.2, ms=9, label="learned grid")
            if part == "digits":
                ax.axhline(data["refs"]["floor_mean"], color="k", ls=":", lw=1, label="real vs real")
            ax.set(xscale="log", yscale="log", xlabel="NFE",
                   ylabel="relative error vs exact ODE at sigma=0" if part == "mixture" else "FID",
                   title="Gaussian mixture (held-out noise)" if part == "mixture" else "digits FID")
            ax.set_xticks(data["nfes"], [str(n) for n in data["nfes"]])
            ax.minorticks_off()
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- CLI

PARTS = ("mixture", "select", "learn", "digits", "guided")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes (smoke test); no files unless asked")
    p.add_argument("--parts", nargs="*", choices=PARTS, default=list(PARTS),
                   help="parts to run (default all; none: only rewrite the tables and plot from --out-json)")
    p.add_argument("--nfe", type=int, nargs="+", default=None, help=f"default {' '.join(map(str, NFES))}")
    p.add_argument("--components", type=int, default=12)
    p.add_argument("--dim", type=int, default=12)
    p.add_argument("--batch", type=int, default=128, help="mixture noise batch (training and held-out each)")
    p.add_argument("--mix-seed", type=int, default=0, help="the mixture (accuracy.py's)")
    p.add_argument("--mix-train-seed", type=int, default=1, help="training noise (accuracy.py's batch)")
    p.add_argument("--mix-test-seed", type=int, default=2, help="held-out noise")
    p.add_argument("--learn-nfe", type=int, nargs="+", default=None,
                   help="NFEs of the mixture's learned grids (3 4 5 6 8 10)")
    p.add_argument("--digits-learn-nfe", type=int, nargs="+", default=None,
                   help="NFEs of the digits' learned grids (5 10); merged with those stored")
    p.add_argument("--digits-rows", nargs="+", choices=("diffusers", "eps", "data", "learned", "counterpart"),
                   default=["diffusers", "eps", "data", "learned", "counterpart"],
                   help="row groups the digits part runs (the others are kept from the stored results)")
    p.add_argument("--learn-train-steps", type=int, default=None)
    p.add_argument("--learn-reference-steps", type=int, default=200)
    p.add_argument("--learn-lr", type=float, default=None)
    p.add_argument("--learn-batch", type=int, default=256, help="digits training noise batch")
    p.add_argument("--digits-train-seed", type=int, default=1, help="digits training noise (selection, learning)")
    p.add_argument("--select-samples", type=int, default=None,
                   help="digits training samples for the hand-grid selection (64; 16 with --quick)")
    p.add_argument("--num-samples", type=int, default=None, help="digits samples per cell (2000; 300 with --quick)")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--seed", type=int, default=0, help="digits held-out noise (digits_fid.py's)")
    p.add_argument("--bootstrap", type=int, default=None, help="bootstrap resamples per FID (100; 20 with --quick)")
    p.add_argument("--guided-samples", type=int, default=None, help="per guided cell (500; 100 with --quick)")
    p.add_argument("--guided-seed", type=int, default=2)
    p.add_argument("--out-json", default=None, help="default benchmarks/low_nfe_results.json (none with --quick)")
    p.add_argument("--out-md", default=None, help="default benchmarks/low_nfe_results.md (none with --quick)")
    p.add_argument("--out-png", default=None, help="default benchmarks/low_nfe.png (none with --quick)")
    args = p.parse_args(argv)
    q = args.quick
    args.nfes = tuple(args.nfe or (QUICK_NFES if q else NFES))
    args.learn_nfe = tuple(args.learn_nfe or ((5,) if q else (3, 4, 5, 6, 8, 10)))
    args.digits_learn_nfe = tuple(args.digits_learn_nfe or ((5,) if q else (5, 10)))
    args.num_samples = args.num_samples or (300 if q else 2000)
    args.select_samples = args.select_samples or (16 if q else 64)
    args.bootstrap = args.bootstrap or (20 if q else 100)
    args.guided_samples = args.guided_samples or (100 if q else 500)
    args.guided_nfes = (5,) if q else GUIDED_NFES
    args.guided_orders = (2,) if q else GUIDED_ORDERS
    args.guidance_scales = (0.0, 4.0) if q else GUIDANCE_SCALES
    if q:
        args.batch = min(args.batch, 32)
    if not q:
        args.out_json = args.out_json or os.path.join(HERE, "low_nfe_results.json")
        args.out_md = args.out_md or os.path.join(HERE, "low_nfe_results.md")
        args.out_png = args.out_png or os.path.join(HERE, "low_nfe.png")
    return args


def learn_settings(args) -> dict:
    return dict(train_steps=args.learn_train_steps, reference_steps=args.learn_reference_steps,
                learning_rate=args.learn_lr)


def learn_kwargs(args) -> None:
    """Fill the training settings left unset with optimize_sigmas' own defaults (reported as used)."""
    import inspect

    if not have_learning():
        return
    params = inspect.signature(dj.optimize_sigmas).parameters
    if args.learn_train_steps is None:
        args.learn_train_steps = params["train_steps"].default
    if args.learn_lr is None:
        args.learn_lr = params["learning_rate"].default


def main(argv=None) -> dict:
    args = parse_args(argv)
    learn_kwargs(args)
    warnings.filterwarnings("ignore")
    if acc.HAVE_DIFFUSERS:
        import torch

        torch.set_num_threads(1)
    store: dict = {}
    if args.out_json and os.path.exists(args.out_json):
        with open(args.out_json) as f:
            store = json.load(f)
    command = "python benchmarks/low_nfe.py " + " ".join(sys.argv[1:] if argv is None else argv)
    meta = store.setdefault("meta", {})
    meta.setdefault("parts", {})
    import flax

    meta["versions"] = f"jax {jax.__version__}, flax {flax.__version__}" + (
        f", torch {__import__('torch').__version__}, diffusers {__import__('diffusers').__version__}"
        if acc.HAVE_DIFFUSERS else ", diffusers not installed")
    for part in PARTS:
        if part not in args.parts:
            continue
        t0 = time.perf_counter()
        if part == "mixture":
            store["mixture"] = mixture_part(args)
        elif part == "select":
            store["select"] = select_part(args)
        elif part == "guided":
            store["guided"] = guided_part(args)
        elif "select" not in store:
            raise SystemExit(f"--parts {part} needs the digits' hand-grid selection: run --parts select first")
        elif part == "learn":
            store["learn"] = learn_part(args, store["select"]["selection"], store.get("learn"))
        else:
            store["digits"] = digits_part(args, store["select"]["selection"], store.get("learn"), store.get("digits"))
        run = dict(command=command, wall=time.perf_counter() - t0,
                   date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"))
        # the runs that made the stored result: this one, after those it merged into (learn, digits)
        meta["parts"][part] = (meta["parts"].get(part, []) if store[part].get("merged") else []) + [run]
        if args.out_json:
            with open(args.out_json, "w") as f:
                json.dump(store, f, indent=1, allow_nan=True)
    text = markdown(store)
    print("\n" + text.split("## Gaussian mixture")[0])
    if args.out_md:
        with open(args.out_md, "w") as f:
            f.write(text)
        print(f"wrote {args.out_md}")
    if args.out_png:
        plot(store, args.out_png)
        print(f"wrote {args.out_png}")
    return store


if __name__ == "__main__":
    main()
