"""Speed, first-call time and memory of `deis_jax.sample` against a hand-written floor and diffusers.

Method
------
* Steady state, DEISConfig(solver_order=3), 20 steps; each contender is one whole generation,
  PRNG key / generator -> final sample:
    sample     `jax.jit` of `deis_jax.sample`, model closed over;
    bare       `jax.jit` of a hand-written `lax.scan` that only does x = a_i x + sum w_i h, h a ring of
               the last 3 model outputs written in place (slot i % 3), with a_i and the weights taken
               from `deis_jax.set_timesteps`: the same arithmetic (checked: identical result), the floor;
    rotating   the same update with the history as a shifted carry (x, e1, e2) and per-lag weights:
               the obvious way to write it, kept to show what XLA's carry copies cost;
    diffusers  PyTorch `DEISMultistepScheduler(solver_order=3)`: set_timesteps, randn, then the
               model/step loop, torch.set_num_threads(1) (XLA keeps its default threads).
  After warm-up the contenders run interleaved, round-robin with a rotating start (A B C D, B C D A,
  ...), so load from other processes on this shared machine hits them all alike. A measurement
  repeats the call until ~20 ms have passed (like timeit), blocking on every result. Reported: median
  time per call and, for each ratio, the median [quartiles] of the per-round ratios (paired).
* First call: a fresh `jax.jit` after `jax.clear_caches()`, timed to the first result (trace, lower,
  compile, run), XLA compile time from `jax.monitoring`; "cold" also clears deis_jax's table cache,
  as in a fresh process. 10/20/50 steps interleaved; `jax.random.normal` alone for reference.
* Peak memory: `jax.jit(f).lower(...).compile().memory_analysis()`: temp + output + argument
  (- alias, zero unless an argument is donated) bytes over one sample's bytes, shape (4, 3, 256, 256).
* Real model: 3 convs of 32 channels, a sinusoidal time embedding added after the first (Flax NNX,
  NHWC) and a torch module with the same layer sizes (NCHW); the torch model alone for 20 calls too,
  so the scheduler's share of a real run shows on both sides.

Run:  python benchmarks/speed.py [--quick] [--out benchmarks/speed_results.md]
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import deis_jax
from deis_jax import DEISConfig

ORDER, STEPS = 3, 20
CONFIG = DEISConfig(solver_order=ORDER)
SHAPES = [(1, 4, 8, 8), (8, 4, 64, 64), (4, 3, 256, 256)]
MEMORY_SHAPE = (4, 3, 256, 256)
FIRST_CALL_SHAPE = (8, 4, 64, 64)
FIRST_CALL_STEPS = (10, 20, 50)
REAL_SHAPE_NCHW = (8, 4, 32, 32)

try:
    import torch
    from diffusers import DEISMultistepScheduler
    torch.set_num_threads(1)
    TORCH_ERROR = None
except Exception as e:  # noqa: BLE001 - any import failure means "skip diffusers"
    torch = DEISMultistepScheduler = None
    TORCH_ERROR = f"{type(e).__name__}: {e}"


def toy_model(x, t):
    return 0.1 * x


# ----------------------------------------------------------------------------- contenders

def make_sample(model_fn, shape, steps=STEPS):
    """jit(key, *params) -> x_0 through deis_jax.sample, calling model_fn(*params, x, t)."""
    def run(key, *params):
        return deis_jax.sample(lambda x, t: model_fn(*params, x, t), key, shape, config=CONFIG,
                               num_inference_steps=steps)
    return jax.jit(run)


def make_bare(model_fn, shape, steps=STEPS):
    """The floor: x = a_i x + sum_slot w[i, slot] h[slot], h a ring of the last 3 outputs.

    a and the per-slot weights are deis_jax.set_timesteps' own, fed to the scan as inputs,
    the new output goes to slot i % 3 by dynamic_update_slice (in place), nothing else is done.
    """
    state = deis_jax.set_timesteps(CONFIG, steps, shape)
    xs = tuple(np.asarray(v) for v in (state.timesteps, state.a, state.weights)) + (np.arange(steps) % ORDER,)

    def run(key, *params):
        x = jax.random.normal(key, shape, jnp.float32)

        def body(carry, inputs):
            x, h = carry
            t, a_i, w, slot = inputs
            h = jax.lax.dynamic_update_index_in_dim(h, model_fn(*params, x, t), slot, 0)
            return (a_i * x + w[0] * h[0] + w[1] * h[1] + w[2] * h[2], h), None

        (x, _), _ = jax.lax.scan(body, (x, jnp.zeros((ORDER, *shape), x.dtype)), xs)
        return x
    return jax.jit(run)


def make_rotating(model_fn, shape, steps=STEPS):
    """The naive form, carry (x, e1, e2) shifted each step: XLA copies the shifted samples."""
    state = deis_jax.set_timesteps(CONFIG, steps, shape)
    w = np.asarray(state.weights)  # weights[i, slot] = c[i, lag] with slot = (i - lag) % order
    c = np.take_along_axis(w, (np.arange(steps)[:, None] - np.arange(ORDER)[None, :]) % ORDER, axis=1)
    xs = (np.asarray(state.timesteps), np.asarray(state.a), c)

    def run(key, *params):
        x = jax.random.normal(key, shape, jnp.float32)

        def body(carry, inputs):
            x, e1, e2 = carry
            t, a_i, c_i = inputs
            e0 = model_fn(*params, x, t)
            return (a_i * x + c_i[0] * e0 + c_i[1] * e1 + c_i[2] * e2, e0, e1), None

        (x, _, _), _ = jax.lax.scan(body, (x, jnp.zeros_like(x), jnp.zeros_like(x)), xs)
        return x
    return jax.jit(run)


def make_diffusers(model, shape, steps=STEPS):
    sched = DEISMultistepScheduler(solver_order=ORDER)
    gen = torch.Generator().manual_seed(0)

    @torch.inference_mode()
    def run(noise=None):
        sched.set_timesteps(steps)
        x = torch.randn(shape, generator=gen) if noise is None else noise
        x = x * sched.init_noise_sigma
        for t in sched.timesteps:
            x = sched.step(model(x, t), t, x).prev_sample
        return x
    return run


def make_torch_model_only(model, shape, steps=STEPS):
    timesteps = torch.arange(steps)

    @torch.inference_mode()
    def run():
        x = torch.randn(shape)
        for t in timesteps:
            x = model(x, t)
        return x
    return run


# ----------------------------------------------------------------------------- real model

def sinusoidal(t, dim, xp):
    half = dim // 2
    freqs = xp.exp(-math.log(10000.0) * xp.arange(half) / half)
    args = t * freqs
    return xp.concatenate([xp.cos(args), xp.sin(args)])[None]


def make_flax_model(channels_in=4, width=32):
    from flax import nnx

    class ConvNet(nnx.Module):
        def __init__(self, rngs):
            self.temb = nnx.Linear(width, width, rngs=rngs)
            self.conv1 = nnx.Conv(channels_in, width, (3, 3), rngs=rngs)
            self.conv2 = nnx.Conv(width, width, (3, 3), rngs=rngs)
            self.conv3 = nnx.Conv(width, channels_in, (3, 3), rngs=rngs)

        def __call__(self, x, t):
            emb = self.temb(sinusoidal(jnp.asarray(t, jnp.float32), width, jnp))
            h = nnx.silu(self.conv1(x) + emb[:, None, None, :])
            return self.conv3(nnx.silu(self.conv2(h)))

    graphdef, params = nnx.split(ConvNet(nnx.Rngs(0)))
    return (lambda p, x, t: nnx.merge(graphdef, p)(x, t)), params


def make_torch_model(channels_in=4, width=32):
    nn = torch.nn

    class ConvNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.temb = nn.Linear(width, width)
            self.conv1 = nn.Conv2d(channels_in, width, 3, padding=1)
            self.conv2 = nn.Conv2d(width, width, 3, padding=1)
            self.conv3 = nn.Conv2d(width, channels_in, 3, padding=1)

        def forward(self, x, t):
            emb = self.temb(sinusoidal(torch.as_tensor(t, dtype=torch.float32), width, torch))
            h = nn.functional.silu(self.conv1(x) + emb[:, :, None, None])
            return self.conv3(nn.functional.silu(self.conv2(h)))

    return ConvNet().eval()


# ----------------------------------------------------------------------------- timing

def _once(fn, number):
    t0 = time.perf_counter()
    for _ in range(number):
        out = fn()
        if hasattr(out, "block_until_ready"):
            out.block_until_ready()
    return (time.perf_counter() - t0) / number


def interleaved(fns: dict, repeats: int, warmup: int = 2, min_time: float = 20e-3):
    """{name: [per-call seconds] * repeats}, measured round-robin with a rotating start."""
    number = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            one = _once(fn, 1)
        number[name] = max(1, min(500, int(min_time / max(one, 1e-7))))
    names = list(fns)
    times = {name: [] for name in names}
    for r in range(repeats):
        for k in range(len(names)):
            name = names[(r + k) % len(names)]
            times[name].append(_once(fns[name], number[name]))
    return times


def ratios(times, a, b):
    """(median, q1, q3) of the per-round ratios a/b."""
    q = statistics.quantiles([x / y for x, y in zip(times[a], times[b], strict=True)], n=4, method="inclusive")
    return q[1], q[0], q[2]


def med(ts):
    return statistics.median(ts)


def fmt_t(seconds):
    return "n/a" if seconds is None else f"{seconds * 1e3:.3f} ms" if seconds < 1 else f"{seconds:.2f} s"


def fmt_r(r):
    return "n/a" if r is None else f"{r[0]:.3f} [{r[1]:.2f}-{r[2]:.2f}]"


# ----------------------------------------------------------------------------- sections

def check_agreement(shape):
    """Max relative differences: bare and rotating vs sample; diffusers vs sample_from_noise on one noise."""
    key = jax.random.key(1)
    ref = make_sample(toy_model, shape)(key)

    def rel(x, y):
        return float(np.max(np.abs(np.asarray(x) - np.asarray(y))) / np.max(np.abs(np.asarray(y))))

    errs = {"bare": rel(make_bare(toy_model, shape)(key), ref),
            "rotating": rel(make_rotating(toy_model, shape)(key), ref)}
    if torch is not None:
        noise = np.asarray(jax.random.normal(key, shape, jnp.float32))
        errs["diffusers"] = rel(make_diffusers(toy_model, shape)(torch.from_numpy(noise)).numpy(),
                                deis_jax.sample_from_noise(toy_model, noise, config=CONFIG, num_inference_steps=STEPS))
    for name, err in errs.items():
        assert err < 1e-4, f"{name} disagrees with deis_jax: max rel. diff {err:.2e}"
    return errs


def bench_toy(repeats):
    rows = []
    key = jax.random.key(0)
    for shape in SHAPES:
        jitted = {"sample": make_sample(toy_model, shape), "bare": make_bare(toy_model, shape),
                  "rotating": make_rotating(toy_model, shape)}
        fns = {name: (lambda f=f: f(key)) for name, f in jitted.items()}
        if torch is not None:
            fns["diffusers"] = make_diffusers(toy_model, shape)
        times = interleaved(fns, repeats)
        row = {"shape": shape, **{k: med(v) for k, v in times.items()},
               "sample/bare": ratios(times, "sample", "bare"), "rotating/bare": ratios(times, "rotating", "bare"),
               "sample/diffusers": ratios(times, "sample", "diffusers") if torch is not None else None}
        rows.append(row)
        print(f"  {shape}: " + ", ".join(f"{k} {fmt_t(row[k])}" for k in fns) + ", "
              + ", ".join(f"{k} {fmt_r(row[k])}" for k in ("sample/bare", "rotating/bare", "sample/diffusers")),
              flush=True)
    return rows


def bench_first_call(repeats):
    """Per step count: cold (jax caches and deis_jax's table cache cleared) and jit-only (tables cached)."""
    events = []
    jax.monitoring.register_event_duration_secs_listener(lambda name, secs, **kw: events.append((name, secs)))
    tables_cache = getattr(deis_jax.solver, "_tables", None)
    key = jax.random.key(0)

    def first_call(make, clear_tables):
        jax.clear_caches()
        if clear_tables and hasattr(tables_cache, "cache_clear"):
            tables_cache.cache_clear()
        events.clear()
        t0 = time.perf_counter()
        make()(key).block_until_ready()
        total = time.perf_counter() - t0
        compiles = [secs for name, secs in events if name.endswith("backend_compile_duration")]
        return dict(total=total, compile=sum(compiles), n_compiles=len(compiles))

    cases = {f"{n} steps, cold": (lambda n=n: make_sample(toy_model, FIRST_CALL_SHAPE, n), True)
             for n in FIRST_CALL_STEPS}
    cases.update({f"{n} steps, tables cached": (lambda n=n: make_sample(toy_model, FIRST_CALL_SHAPE, n), False)
                  for n in FIRST_CALL_STEPS})
    cases["jax.random.normal alone"] = (lambda: jax.jit(lambda k: jax.random.normal(k, FIRST_CALL_SHAPE)), False)
    runs = {name: [] for name in cases}
    for _ in range(repeats):
        for n in FIRST_CALL_STEPS:  # interleave 10/20/50, cold then cached
            for name in (f"{n} steps, cold", f"{n} steps, tables cached"):
                runs[name].append(first_call(*cases[name]))
        runs["jax.random.normal alone"].append(first_call(*cases["jax.random.normal alone"]))
    rows = []
    for name, rs in runs.items():
        row = dict(name=name, total=med([r["total"] for r in rs]), max=max(r["total"] for r in rs),
                   compile=med([r["compile"] for r in rs]), n_compiles=rs[0]["n_compiles"])
        rows.append(row)
        print(f"  {name}: {row['total']:.3f} s (max {row['max']:.3f}; XLA compile {row['compile']:.3f} s in "
              f"{row['n_compiles']} executables)", flush=True)
    return rows


def bench_memory():
    shape = MEMORY_SHAPE
    sample_bytes = math.prod(shape) * 4
    key = jax.random.key(0)
    cases = {
        "deis_jax.sample (key -> x)": (make_sample(toy_model, shape), key),
        "deis_jax.sample_from_noise (noise -> x)": (
            jax.jit(lambda z: deis_jax.sample_from_noise(toy_model, z, config=CONFIG, num_inference_steps=STEPS)),
            jnp.zeros(shape, jnp.float32)),
        "deis_jax.sample_from_noise, noise donated": (
            jax.jit(lambda z: deis_jax.sample_from_noise(toy_model, z, config=CONFIG, num_inference_steps=STEPS),
                    donate_argnums=0),
            jnp.zeros(shape, jnp.float32)),
        "bare scan (key -> x)": (make_bare(toy_model, shape), key),
        "jax.random.normal alone (key -> noise)": (jax.jit(lambda k: jax.random.normal(k, shape)), key),
    }
    rows = []
    for name, (f, arg) in cases.items():
        m = f.lower(arg).compile().memory_analysis()
        row = dict(name=name, temp=m.temp_size_in_bytes / sample_bytes, output=m.output_size_in_bytes / sample_bytes,
                   argument=m.argument_size_in_bytes / sample_bytes, alias=m.alias_size_in_bytes / sample_bytes)
        row["peak"] = row["temp"] + row["output"] + row["argument"] - row["alias"]
        rows.append(row)
        print(f"  {name}: {row['peak']:.4f} samples (temp {row['temp']:.4f}, output {row['output']:.4f}, "
              f"argument {row['argument']:.6f})", flush=True)
    return rows


def bench_real(repeats):
    n, c, h, w = REAL_SHAPE_NCHW
    shape = (n, h, w, c)  # NHWC for flax
    model_fn, params = make_flax_model(c)
    key = jax.random.key(0)
    f_sample, f_bare = make_sample(model_fn, shape), make_bare(model_fn, shape)
    fns = {"sample": lambda: f_sample(key, params), "bare": lambda: f_bare(key, params)}
    if torch is not None:
        tmodel = make_torch_model(c)
        fns["diffusers"] = make_diffusers(tmodel, REAL_SHAPE_NCHW)
        fns["torch model only"] = make_torch_model_only(tmodel, REAL_SHAPE_NCHW)
    times = interleaved(fns, repeats)
    row = {k: med(v) for k, v in times.items()}
    row["sample/bare"] = ratios(times, "sample", "bare")
    if torch is not None:
        row["sample/diffusers"] = ratios(times, "sample", "diffusers")
        row["torch model only/diffusers"] = ratios(times, "torch model only", "diffusers")
    print("  " + ", ".join(f"{k} {fmt_t(v) if isinstance(v, float) else fmt_r(v)}" for k, v in row.items()), flush=True)
    return row


# ----------------------------------------------------------------------------- report

def load():
    return "/".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "?"


def machine(load_at_start):
    import flax
    import jaxlib
    versions = [f"jax {jax.__version__}", f"jaxlib {jaxlib.__version__}", f"flax {flax.__version__}"]
    if torch is not None:
        import diffusers
        versions += [f"torch {torch.__version__} (set_num_threads(1))", f"diffusers {diffusers.__version__}"]
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "?"
    return [
        f"Date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"Machine: {platform.platform()} ({platform.machine()}, processor '{platform.processor() or '?'}'), "
        f"os.cpu_count() = {os.cpu_count()}, usable {usable}; shared with other work, so timings are noisy "
        f"(1/5/15-min load average {load_at_start} at start, {load()} at end)",
        f"Python {platform.python_version()}; " + ", ".join(versions)
        + f"; JAX devices {jax.devices()}, XLA with its default threads",
    ]


def verdict(ok):
    return "**met**" if ok else "**MISSED**"


def report(args, load_at_start, repeats, first_repeats, errs, toy, first, mem, real):
    out = ["# deis_jax speed benchmark", "", *[f"- {m}" for m in machine(load_at_start)],
           f"- Command: `{' '.join(['python', 'benchmarks/speed.py', *sys.argv[1:]])}`: {repeats} interleaved rounds "
           f"per timing table after 2 warm-up calls, {first_repeats} for first calls; times are medians, ratios are "
           "the median [quartiles] of the per-round ratios.",
           "- Agreement (max rel. diff vs deis_jax, shape (1, 4, 8, 8)): "
           + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()), ""]
    if torch is None:
        out += [f"diffusers/torch unavailable, skipped: {TORCH_ERROR}", ""]

    out += [f"## Near-free model `0.1 * x`, DEISConfig(solver_order={ORDER}), {STEPS} steps, one generation", "",
            "bare = floor (ring of 3 outputs, in-place update); rotating = the same with a shifted (x, e1, e2) carry.",
            "", "| shape | deis_jax.sample | bare scan | rotating scan | diffusers | sample/bare | rotating/bare "
            "| sample/diffusers |", "|---|---|---|---|---|---|---|---|"]
    for r in toy:
        out.append(f"| {r['shape']} | {fmt_t(r['sample'])} | {fmt_t(r['bare'])} | {fmt_t(r['rotating'])} "
                   f"| {fmt_t(r.get('diffusers'))} | {fmt_r(r['sample/bare'])} | {fmt_r(r['rotating/bare'])} "
                   f"| {fmt_r(r['sample/diffusers'])} |")

    out += ["", f"## First call of a fresh `jax.jit(sample)` (after jax.clear_caches()), shape {FIRST_CALL_SHAPE}", "",
            "cold: deis_jax's table cache cleared too, as in a fresh process; tables cached: only the jit is new.", "",
            "| case | total (median) | total (max) | XLA compile (median) | executables compiled |",
            "|---|---|---|---|---|"]
    for r in first:
        out.append(f"| {r['name']} | {r['total']:.3f} s | {r['max']:.3f} s | {r['compile']:.3f} s "
                   f"| {r['n_compiles']} |")

    out += ["", f"## Peak memory, `jit(f).lower(...).compile().memory_analysis()`, shape {MEMORY_SHAPE}, "
            f"in samples of {math.prod(MEMORY_SHAPE) * 4 / 2**20:.1f} MiB", "",
            "| function | temp | output | argument | alias | peak = temp + output + argument - alias |",
            "|---|---|---|---|---|---|"]
    for r in mem:
        out.append(f"| {r['name']} | {r['temp']:.4f} | {r['output']:.4f} | {r['argument']:.6f} | {r['alias']:.4f} "
                   f"| {r['peak']:.4f} |")

    n, c, h, w = REAL_SHAPE_NCHW
    out += ["", f"## Small real model (3 convs x 32 channels + time embedding), {STEPS} steps, "
            f"{REAL_SHAPE_NCHW} NCHW (torch) / {(n, h, w, c)} NHWC (Flax NNX)", "",
            "| contender | time per generation |", "|---|---|"]
    out += [f"| {k} | {fmt_t(real[k])} |" for k in ("sample", "bare", "diffusers", "torch model only") if k in real]
    share = 1 - real["sample/bare"][0] ** -1
    out += ["", f"- sample/bare = {fmt_r(real['sample/bare'])}: deis_jax's scheduler cost above the floor is "
            f"{100 * share:.1f}% of the run"]
    if torch is not None:
        out += [f"- sample/diffusers = {fmt_r(real['sample/diffusers'])}; diffusers' scheduler is "
                f"{100 * (1 - real['torch model only/diffusers'][0]):.1f}% of its run (1 - model only / diffusers)"]

    worst_bare = max(r["sample/bare"][0] for r in toy)
    cold = {n: next(r["total"] for r in first if r["name"] == f"{n} steps, cold") for n in FIRST_CALL_STEPS}
    growth = cold[FIRST_CALL_STEPS[-1]] / cold[FIRST_CALL_STEPS[0]]
    peak = mem[0]["peak"]
    out += ["", "## Targets", "",
            f"- sample/bare <= 1.3 at every shape: worst {worst_bare:.3f} -> {verdict(worst_bare <= 1.3)}"]
    if torch is not None:
        worst_d = max(r["sample/diffusers"][0] for r in toy)
        out.append(f"- sample/diffusers <= 0.5 at every shape: worst {worst_d:.3f} -> {verdict(worst_d <= 0.5)}")
    else:
        out.append("- sample/diffusers <= 0.5: not measured (diffusers/torch unavailable)")
    out += [f"- first call <= 3 s for 10/20/50 steps (cold): worst median {max(cold.values()):.2f} s -> "
            f"{verdict(max(cold.values()) <= 3)}",
            f"- first call not growing with step count (cold 50-step / 10-step <= 1.25): {growth:.2f} -> "
            f"{verdict(growth <= 1.25)}",
            f"- peak loop memory of deis_jax.sample <= solver_order + 4 = {ORDER + 4} samples: {peak:.4f} -> "
            f"{verdict(peak <= ORDER + 4)}"
            + (f" (over by {(peak - ORDER - 4) * math.prod(MEMORY_SHAPE) * 4:.0f} bytes)" if peak > ORDER + 4 else "")]
    return "\n".join(out) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (smoke test)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "speed_results.md"))
    args = parser.parse_args(argv)
    repeats, first_repeats = (3, 1) if args.quick else (21, 5)
    load_at_start = load()

    jax.jit(lambda x: x + 1)(jnp.ones(2)).block_until_ready()  # backend start-up is not part of any first call
    print("agreement ...", flush=True)
    errs = check_agreement(SHAPES[0])
    print("near-free model ...", flush=True)
    toy = bench_toy(repeats)
    print("first call ...", flush=True)
    first = bench_first_call(first_repeats)
    print("memory ...", flush=True)
    mem = bench_memory()
    print("real model ...", flush=True)
    real = bench_real(repeats)
    text = report(args, load_at_start, repeats, first_repeats, errs, toy, first, mem, real)
    with open(args.out, "w") as f:
        f.write(text)
    print("\n" + text + f"\nwritten to {args.out}")


if __name__ == "__main__":
    sys.exit(main())
