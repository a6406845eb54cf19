"""Sample quality vs NFE on real data: a digits "FID" of deis_jax's samplers and diffusers' DPM-Solver++.

Method
------
* Model: the bundled eps-prediction DigitsUNet (`load_digits_unet`, DEISConfig() linear schedule) on sklearn's
  8x8 digits in [-1, 1]. Every sampler starts from the same x_T: `--num-samples` standard-normal images drawn
  from `--seed`, generated in batches of `--batch-size`.
* Samplers, at each NFE (model evaluations per sample):
    DEIS logrho-3, tab-4 (quadratic spacing; and linspace, to separate solver from spacing), rhoab-3, ipndm-4,
    DDIM (= logrho-1): NFE steps (every sampler but tab-4 (quadratic) uses linspace spacing);
    DEIS rhork-k (k = `--rhork-order`): NFE // k steps of k evaluations (real NFE in brackets when lower);
    (each a `jax.jit` of `sample_from_noise`, compiled once per (config, NFE), model parameters an argument);
    diffusers DPMSolverMultistepScheduler (dpmsolver++, order 2, same betas and linspace spacing) driving the
  same jitted JAX model from a Python loop (numpy <-> torch each step); skipped if diffusers does not import.
* Samples are clipped to [-1, 1] (as saving them as images would) before the metrics; how many pixels
  overshot by more than 0.1 is reported too.
* Metrics, with the small CNN `deis_jax.models.classifier` (99.7% held-out accuracy) as the feature net:
    FID: Frechet distance between Gaussians fitted to the 64-d penultimate features of the generated samples
      and of all 1,797 real digits, |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) (eigen-decomposition, float64);
    confidence: mean max-softmax probability of the classifier on the samples.
  References: real-vs-real FID of random split halves (a noise floor; mean over 5 splits; ~900 vs ~900 images,
  so it carries more small-sample bias than 2,000 vs 1,797), N(0, I) images clipped to [-1, 1] (a ceiling),
  and the confidence on the real digits.
* Solver error: DEIS rhoab-3 at `--ref-nfe` (default 100) steps stands in for the exact ODE solution from the
  same x_T (it is ~0.002 RMS from rhoab-3 / tab-4 at NFE 200, which agree to 0.0003); each cell reports the RMS
  pixel distance of its samples to it. FID measures model + solver error against data; this, the solver alone.

Run:  python benchmarks/digits_fid.py [--num-samples 2000] [--nfe 5 10 15 20 50] [--quick]
          [--out-md benchmarks/digits_fid_results.md] [--out-png benchmarks/digits_fid.png]
(--quick: 500 samples, NFE 5 10 20; writes files only when --out-md / --out-png are given.)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import deis_jax  # noqa: E402
from deis_jax import DEISConfig  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_NFES = (5, 10, 15, 20, 50)
SHAPE = (8, 8, 1)
OUT_OF_RANGE = 1.1  # a pixel this far outside [-1, 1] counts as overshoot


# ----------------------------------------------------------------------------- data and metrics

def real_digits() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 sklearn digits as float32 [N, 8, 8, 1] in [-1, 1], and their labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images.astype(np.float32) / 8.0 - 1.0)[..., None], d.target


def make_embedder(classifier, batch_size: int = 500) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """images [N, 8, 8, 1] -> (features [N, 64] float64, softmax probabilities [N, 10] float64), batched."""
    from flax import nnx

    graphdef, state = nnx.split(classifier)

    @jax.jit
    def run(state, x):
        net = nnx.merge(graphdef, state)
        feats = net.features(x)
        return feats, jax.nn.softmax(net.out(feats), axis=-1)

    def embed(images):
        out = [run(state, jnp.asarray(images[i:i + batch_size], jnp.float32))
               for i in range(0, len(images), batch_size)]
        return tuple(np.concatenate([np.asarray(o[k]) for o in out]).astype(np.float64) for k in (0, 1))

    return embed


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of [N, D] features, float64."""
    f = np.asarray(features, np.float64)
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1, s1, mu2, s2) -> float:
    """|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)), with tr((S1 S2)^(1/2)) computed as the sum of
    square roots of the eigenvalues of the symmetric PSD S1^(1/2) S2 S1^(1/2)."""
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    m = root1 @ s2 @ root1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2.0), 0.0, None)).sum()
    diff = np.asarray(mu1) - np.asarray(mu2)
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def fid(features_a: np.ndarray, features_b: np.ndarray) -> float:
    return frechet_distance(*gaussian_stats(features_a), *gaussian_stats(features_b))


def split_half_fid(features: np.ndarray, seed: int = 0, repeats: int = 5) -> tuple[float, float]:
    """Mean and std of the FID between random halves of `features` (the noise floor)."""
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(repeats):
        perm = rng.permutation(len(features))
        half = len(features) // 2
        vals.append(fid(features[perm[:half]], features[perm[half:]]))
    return float(np.mean(vals)), float(np.std(vals))


def initial_noise(seed: int, num: int) -> np.ndarray:
    """The shared x_T: [num, 8, 8, 1] standard normal, float32."""
    return np.asarray(jax.random.normal(jax.random.key(seed), (num, *SHAPE), jnp.float32))


# ----------------------------------------------------------------------------- samplers

@dataclasses.dataclass(frozen=True)
class Sampler:
    """A row of the table: a DEIS config (run with deis_jax) or None for diffusers' DPM-Solver++."""

    name: str
    config: DEISConfig | None
    evals_per_step: int = 1

    def steps(self, nfe: int) -> int:
        return max(nfe // self.evals_per_step, 1)


REFERENCE = Sampler("DEIS rhoab-3", DEISConfig(solver_type="rhoab", solver_order=3))


def default_samplers(rhork_order: int = 2, with_diffusers: bool = True) -> list[Sampler]:
    rows = [
        Sampler("DEIS logrho-3", DEISConfig(solver_type="logrho", solver_order=3)),
        Sampler("DEIS tab-4 (quadratic)", DEISConfig(solver_type="tab", solver_order=4, timestep_spacing="quadratic")),
        Sampler("DEIS tab-4 (linspace)", DEISConfig(solver_type="tab", solver_order=4)),
        Sampler("DEIS rhoab-3", DEISConfig(solver_type="rhoab", solver_order=3)),
        Sampler("DEIS ipndm-4", DEISConfig(solver_type="ipndm", solver_order=4)),
        Sampler(f"DEIS rhork-{rhork_order}", DEISConfig(solver_type="rhork", solver_order=rhork_order), rhork_order),
        Sampler("DDIM (logrho-1)", DEISConfig(solver_type="logrho", solver_order=1)),
    ]
    if with_diffusers:
        rows.append(Sampler("diffusers DPM-Solver++(2M)", None))
    return rows


def diffusers_error() -> str | None:
    """None if diffusers' DPMSolverMultistepScheduler imports, else the reason."""
    try:
        import torch  # noqa: F401
        from diffusers import DPMSolverMultistepScheduler  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means "skip diffusers"
        return f"{type(e).__name__}: {e}"
    return None


def make_generator(model, sampler: Sampler, nfe: int) -> Callable[[np.ndarray], np.ndarray]:
    """noise batch [B, 8, 8, 1] -> samples, for one (sampler, NFE); DEIS compiles on the first call."""
    from flax import nnx

    graphdef, state = nnx.split(model)
    steps = sampler.steps(nfe)

    if sampler.config is not None:
        config = sampler.config

        @jax.jit
        def run(state, noise):
            net = nnx.merge(graphdef, state)
            return deis_jax.sample_from_noise(lambda x, t: net(x, t), noise, config=config,
                                              num_inference_steps=steps)

        return lambda noise: np.asarray(run(state, jnp.asarray(noise)))

    import torch
    from diffusers import DPMSolverMultistepScheduler

    base = DEISConfig()
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=base.num_train_timesteps, beta_start=base.beta_start, beta_end=base.beta_end,
        beta_schedule=base.beta_schedule, solver_order=2, algorithm_type="dpmsolver++",
        timestep_spacing=base.timestep_spacing, lower_order_final=True)
    model_fn = jax.jit(lambda state, x, t: nnx.merge(graphdef, state)(x, t))

    def run_diffusers(noise):
        scheduler.set_timesteps(steps)
        x = torch.from_numpy(np.array(noise, np.float32)) * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            x_in = scheduler.scale_model_input(x, t)
            eps = model_fn(state, jnp.asarray(x_in.numpy()), jnp.int32(int(t)))
            x = scheduler.step(torch.from_numpy(np.array(eps)), t, x).prev_sample
        return x.numpy()

    return run_diffusers


def batched(gen: Callable[..., np.ndarray], batch_size: int, *arrays: np.ndarray) -> np.ndarray:
    """gen(*batch) over the arrays (equal first axes) batch by batch, the last batch zero-padded; concatenated."""
    n = len(arrays[0])
    pad = (-n) % batch_size
    if pad:
        arrays = tuple(np.concatenate([a, np.zeros((pad, *a.shape[1:]), a.dtype)]) for a in arrays)
    out = [gen(*(a[i:i + batch_size] for a in arrays)) for i in range(0, n + pad, batch_size)]
    return np.concatenate(out)[:n]


def generate(model, sampler: Sampler, nfe: int, noise: np.ndarray, batch_size: int) -> np.ndarray:
    """All samples for one (sampler, NFE), batch by batch from the shared noise (last batch zero-padded)."""
    return batched(make_generator(model, sampler, nfe), batch_size, noise)


@dataclasses.dataclass
class Cell:
    fid: float
    confidence: float
    out_of_range: float
    ode_error: float
    nfe: int
    seconds: float
    finite: bool


def evaluate(images: np.ndarray, embed, real_stats) -> tuple[float, float, float, bool]:
    """(FID vs the real statistics, mean max-softmax, % of pixels with |x| > 1.1, all finite) of images.

    The images are clipped to [-1, 1] before the classifier sees them, as saving them as pictures would;
    non-finite samples give nan metrics.
    """
    finite = bool(np.isfinite(images).all())
    if not finite:
        return float("nan"), float("nan"), float("nan"), False
    feats, probs = embed(np.clip(images, -1.0, 1.0))
    return (frechet_distance(*gaussian_stats(feats), *real_stats), float(probs.max(axis=1).mean()),
            100.0 * float((np.abs(images) > OUT_OF_RANGE).mean()), True)


def held_out_accuracy(probs: np.ndarray, labels: np.ndarray, seed: int = 0, test_fraction: float = 0.2) -> float:
    """Accuracy on the digits examples/train_digits_classifier.py held out with its default --seed/--test-fraction."""
    from sklearn.model_selection import train_test_split

    _, test_idx = train_test_split(np.arange(len(labels)), test_size=test_fraction, stratify=labels,
                                   random_state=seed)
    return float((probs[test_idx].argmax(1) == labels[test_idx]).mean())


def rms(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((np.asarray(a, np.float64) - b) ** 2)))


def run_benchmark(model, classifier, samplers, nfes, num_samples, batch_size, seed=0, ref_nfe=100, log=print):
    """Every (sampler, NFE) cell, plus the references; returns a dict of results.

    With ref_nfe > 0 the ODE solution is also approximated by DEIS rhoab-3 at ref_nfe steps, and every
    cell records the RMS pixel distance of its (unclipped) samples to it: the solver's own error.
    """
    real, labels = real_digits()
    embed = make_embedder(classifier, batch_size)
    real_feats, real_probs = embed(real)
    real_stats = gaussian_stats(real_feats)
    noise = initial_noise(seed, num_samples)
    floor_mean, floor_std = split_half_fid(real_feats, seed)
    noise_fid, noise_conf, _, _ = evaluate(np.clip(initial_noise(seed + 1, num_samples), -1, 1), embed, real_stats)
    refs = dict(
        real_accuracy=float((real_probs.argmax(1) == labels).mean()),
        held_out_accuracy=held_out_accuracy(real_probs, labels),
        real_confidence=float(real_probs.max(1).mean()),
        floor_mean=floor_mean, floor_std=floor_std, noise_fid=noise_fid, noise_confidence=noise_conf)
    log(f"real: accuracy {refs['real_accuracy']:.4f} (held out {refs['held_out_accuracy']:.4f}), confidence "
        f"{refs['real_confidence']:.4f}; split-half FID {floor_mean:.3f} +- {floor_std:.3f}; clipped-noise FID "
        f"{noise_fid:.2f}, confidence {noise_conf:.3f}")
    reference = None
    if ref_nfe:
        t0 = time.perf_counter()
        reference = generate(model, REFERENCE, ref_nfe, noise, batch_size)
        f, conf, oor, _ = evaluate(reference, embed, real_stats)
        refs.update(ode_nfe=ref_nfe, ode_fid=f, ode_confidence=conf, ode_out_of_range=oor)
        log(f"ODE reference ({REFERENCE.name}, NFE {ref_nfe}): FID {f:.3f}  confidence {conf:.4f}  "
            f"|x|>{OUT_OF_RANGE}: {oor:5.2f}%  ({time.perf_counter() - t0:5.1f}s)")

    cells: dict[str, dict[int, Cell]] = {}
    for s in samplers:
        cells[s.name] = {}
        for nfe in nfes:
            t0 = time.perf_counter()
            images = generate(model, s, nfe, noise, batch_size)
            seconds = time.perf_counter() - t0
            f, conf, oor, finite = evaluate(images, embed, real_stats)
            err = rms(images, reference) if reference is not None and finite else float("nan")
            cells[s.name][nfe] = Cell(f, conf, oor, err, s.steps(nfe) * s.evals_per_step, seconds, finite)
            log(f"{s.name:28s} NFE {nfe:3d}: FID {f:8.3f}  confidence {conf:.4f}  |x|>{OUT_OF_RANGE}: {oor:5.2f}%  "
                f"RMS to ODE {err:.4f}  ({seconds:5.1f}s)", flush=True)
    return dict(cells=cells, refs=refs, nfes=list(nfes), num_samples=num_samples)


# ----------------------------------------------------------------------------- reporting

def _cell_text(cell: Cell, nfe: int, value: float, fmt: str) -> str:
    text = "non-finite" if not cell.finite else format(value, fmt)
    return text + (f" ({cell.nfe})" if cell.nfe != nfe else "")


def markdown_tables(results) -> str:
    nfes, cells = results["nfes"], results["cells"]
    header = "| sampler | " + " | ".join(f"NFE {n}" for n in nfes) + " |\n|---|" + "---|" * len(nfes) + "\n"
    out = []
    for title, attr, fmt in (("FID (lower is better)", "fid", ".3f"),
                             ("Mean max-softmax confidence (higher is better)", "confidence", ".4f"),
                             ("RMS pixel distance to the ODE reference solution (solver error)", "ode_error", ".4f"),
                             (f"% of pixels with |x| > {OUT_OF_RANGE} before clipping", "out_of_range", ".2f"),
                             ("Wall time per cell, s (compile + generate + embed)", "seconds", ".1f")):
        rows = [f"| {name} | " + " | ".join(_cell_text(row[n], n, getattr(row[n], attr), fmt) for n in nfes) + " |"
                for name, row in cells.items()]
        out.append(f"### {title}\n\n{header}" + "\n".join(rows) + "\n")
    return "\n".join(out)


def write_markdown(path: str, results, meta: dict) -> None:
    r = results["refs"]
    refs = [("real vs real, split halves (~900 vs ~900, mean +- std of 5 splits): the noise floor",
             f"{r['floor_mean']:.3f} +- {r['floor_std']:.3f}", f"{r['real_confidence']:.4f} (all real)"),
            ("N(0, I) clipped to [-1, 1] vs real", f"{r['noise_fid']:.2f}", f"{r['noise_confidence']:.4f}")]
    if "ode_fid" in r:
        refs.append((f"ODE solution ({REFERENCE.name} at NFE {r['ode_nfe']}) vs real; {r['ode_out_of_range']:.2f}% "
                     f"of its pixels overshoot", f"{r['ode_fid']:.3f}", f"{r['ode_confidence']:.4f}"))
    ref_rows = "\n".join(f"| {a} | {b} | {c} |" for a, b, c in refs)
    text = f"""# Digits FID: deis_jax samplers vs NFE on real data

- Date: {meta['date']}; total wall time {meta['wall']:.0f} s
- Machine: {platform.platform()}, os.cpu_count() = {os.cpu_count()} (shared with other work: timings are noisy)
- Versions: Python {platform.python_version()}, jax {jax.__version__}, {meta['versions']}
- Command: `{meta['command']}`
- Samples: {results['num_samples']} per cell, the same x_T for every sampler (seed {meta['seed']}), batches of \
{meta['batch_size']}
- Model: the bundled DigitsUNet (eps prediction, DEISConfig() linear betas, 1000 steps)
- Feature net: `deis_jax.models.classifier` (64-d penultimate features, trained by
  `examples/train_digits_classifier.py`): accuracy {r['held_out_accuracy']:.4f} on its 360 held-out digits,
  {r['real_accuracy']:.4f} on all 1,797
- Method: see the docstring of `benchmarks/digits_fid.py`. A number in brackets is the real NFE when it is below
  the column's (rhoRK takes NFE // order steps).{meta['skip_note']}

Reading the tables:
- FID compares samples with data, so it includes the model's own error: the converged ODE solution (References)
  is not at the noise floor, and a coarse solver can land closer to the data than the exact solution does. The
  RMS distance to the ODE reference measures the solver alone.
- The multistep samplers lower their order on the last steps only below 15 steps (`lower_order_final`, diffusers'
  rule). With linspace spacing the last step spans a wide log-rho interval (t ~ 1000/N -> 0, rho ~0.08 -> 0.01 at
  NFE 50), so from NFE 15 on it is taken at full order: watch for a jump in overshoot between NFE 10 and 15.
- diffusers' DPM-Solver++ (final_sigmas_type="zero") ends at sigma = 0 with a first-order last step, i.e. it
  returns the model's denoised estimate; deis_jax ends at sigma(t=0) = 0.01, as diffusers' DEIS does. So its
  RMS distance to the (deis_jax) ODE reference does not go to 0, and its overshoot stays lower.

## References

| reference | FID | confidence |
|---|---|---|
{ref_rows}

## Samplers

{markdown_tables(results)}"""
    with open(path, "w") as f:
        f.write(text)


def plot(path: str, results) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, row in results["cells"].items():
        pts = [(c.nfe, c.fid) for c in row.values() if c.finite]
        ax.plot(*zip(*pts, strict=True), marker="o", label=name)
    r = results["refs"]
    ax.axhline(r["floor_mean"], color="black", ls="--", lw=1, label="real vs real (split halves)")
    if "ode_fid" in r:
        ax.axhline(r["ode_fid"], color="black", ls=":", lw=1.2,
                   label=f"ODE solution ({REFERENCE.name}, NFE {r['ode_nfe']})")
    ax.set(xscale="log", yscale="log", xlabel="NFE", ylabel="FID (classifier features)",
           title=f"8x8 digits, {results['num_samples']} samples per point")
    ax.set_xticks(results["nfes"], [str(n) for n in results["nfes"]])
    ax.minorticks_off()
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- CLI

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-samples", type=int, default=None, help="samples per cell (default 2000; 500 with --quick)")
    p.add_argument("--nfe", type=int, nargs="+", default=None, help="NFE list (default 5 10 15 20 50)")
    p.add_argument("--quick", action="store_true", help="500 samples at NFE 5 10 20; no files unless asked")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ref-nfe", type=int, default=100, help="NFE of the ODE reference solution (0: none)")
    p.add_argument("--rhork-order", type=int, default=2, choices=(2, 3))
    p.add_argument("--out-md", default=None, help="default benchmarks/digits_fid_results.md (none with --quick)")
    p.add_argument("--out-png", default=None, help="default benchmarks/digits_fid.png (none with --quick)")
    args = p.parse_args(argv)
    args.num_samples = args.num_samples or (500 if args.quick else 2000)
    args.nfe = args.nfe or ([5, 10, 20] if args.quick else list(DEFAULT_NFES))
    if not args.quick:
        args.out_md = args.out_md or os.path.join(HERE, "digits_fid_results.md")
        args.out_png = args.out_png or os.path.join(HERE, "digits_fid.png")
    if args.num_samples < 2 or args.batch_size < 1 or min(args.nfe) < 1:
        p.error("--num-samples must be >= 2, --batch-size and every --nfe >= 1")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    from deis_jax.models.classifier import load_digits_classifier
    from deis_jax.models.unet import load_digits_unet

    start = time.perf_counter()
    skip = diffusers_error()
    if skip:
        print(f"diffusers unavailable, DPM-Solver++ row skipped ({skip})")
    else:
        import torch

        torch.set_num_threads(1)
    samplers = default_samplers(args.rhork_order, with_diffusers=skip is None)
    results = run_benchmark(load_digits_unet(), load_digits_classifier(), samplers, args.nfe, args.num_samples,
                            args.batch_size, args.seed, args.ref_nfe)
    wall = time.perf_counter() - start
    print("\n" + markdown_tables(results))
    print(f"total wall time {wall:.1f}s")

    import flax

    versions = f"flax {flax.__version__}"
    if skip is None:
        import diffusers
        import torch

        versions += f", torch {torch.__version__}, diffusers {diffusers.__version__}"
    command = " ".join(["python benchmarks/digits_fid.py", *(sys.argv[1:] if argv is None else argv)])
    meta = dict(date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), wall=wall,
                versions=versions, command=command,
                seed=args.seed, batch_size=args.batch_size,
                skip_note=f"\n- diffusers row skipped: {skip}" if skip else "")
    if args.out_md:
        write_markdown(args.out_md, results, meta)
        print(f"wrote {args.out_md}")
    if args.out_png:
        plot(args.out_png, results)
        print(f"wrote {args.out_png}")
    return results


if __name__ == "__main__":
    main()
