"""Speed, compile time and memory of `deis_jax.sample` against a hand-written floor and diffusers.

Method
------
* Steady-state time (20 steps, DEISConfig(solver_order=3)). Three contenders, each one full
  generation from a PRNG key / generator to the final sample:
    sample     `jax.jit` of `deis_jax.sample` with the model closed over;
    bare       `jax.jit` of a hand-written `lax.scan` doing only x = a_i x + w0 e0 + w1 e1 + w2 e2
               (e0 the new model output, e1, e2 the two before), with a_i and the per-lag weights
               taken from `deis_jax.set_timesteps`, so it does the same arithmetic (checked: the two
               agree to float32 rounding) and is the floor any scheduler can reach;
    diffusers  PyTorch `DEISMultistepScheduler(solver_order=3)`: set_timesteps, randn, then the
               model/step loop, with torch.set_num_threads(1) (XLA keeps its default threads).
  After warm-up the contenders run interleaved, round-robin with a rotating start (A B C, B C A, ...),
  so that load from other processes on this shared machine hits all of them alike. Each
  measurement repeats the call `number` times (calibrated to >= ~5 ms, like timeit) and ends with
  `block_until_ready`. Reported: the median per-call time, and each ratio as the median of
  the per-round ratios (paired, so slow drifts cancel).
* First call: a fresh `jax.jit` after `jax.clear_caches()` and clearing deis_jax's table cache,
  timed to the end of the first result (trace + lower + compile + run), split with
  `jax.monitoring` events; 10/20/50 steps interleaved, median of the repeats.
* Peak memory: `jax.jit(f).lower(...).compile().memory_analysis()`, (temp + output + argument
  bytes) / one sample's bytes, for shape (4, 3, 256, 256).
* Real model: 3 convs of 32 channels with a sinusoidal time embedding added after the first
  (Flax NNX, NHWC) and an equivalent torch module (NCHW, same layer sizes); also the torch model
  alone for 20 calls, so the scheduler's share of a real run is visible on both sides.

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
    """jit(key, *params) -> x_0 through deis_jax.sample; model_fn(params, x, t)."""
    def run(key, *params):
        return deis_jax.sample(lambda x, t: model_fn(*params, x, t), key, shape, config=CONFIG,
                               num_inference_steps=steps)
    return jax.jit(run)


def lag_tables(shape, steps=STEPS):
    """(timesteps, a [N], c [N, order]) with c[i, j] the weight of the output from j steps back.

    deis_jax stores weights per ring slot: weights[i, slot] = c[i, (i - slot) % order].
    """
    state = deis_jax.set_timesteps(CONFIG, steps, shape)
    w = np.asarray(state.weights)
    slot = (np.arange(w.shape[0])[:, None] - np.arange(ORDER)[None, :]) % ORDER
    return np.asarray(state.timesteps), np.asarray(state.a), np.take_along_axis(w, slot, axis=1)


def make_bare(model_fn, shape, steps=STEPS):
    timesteps, a, c = lag_tables(shape, steps)

    def run(key, *params):
        x = jax.random.normal(key, shape, jnp.float32)
        zero = jnp.zeros_like(x)

        def body(carry, inputs):
            x, e1, e2 = carry
            t, a_i, w = inputs
            e0 = model_fn(*params, x, t)
            return (a_i * x + w[0] * e0 + w[1] * e1 + w[2] * e2, e0, e1), None

        (x, _, _), _ = jax.lax.scan(body, (x, zero, zero), (timesteps, a, c))
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


def interleaved(fns: dict, repeats: int, warmup: int = 2, min_time: float = 5e-3):
    """{name: [per-call seconds] * repeats}, measured round-robin with a rotating start."""
    number = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            one = _once(fn, 1)
        number[name] = max(1, min(200, int(min_time / max(one, 1e-7))))
    names = list(fns)
    times = {name: [] for name in names}
    for r in range(repeats):
        for k in range(len(names)):
            name = names[(r + k) % len(names)]
            times[name].append(_once(fns[name], number[name]))
    return times


def paired_ratio(times, a, b):
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def med(ts):
    return statistics.median(ts)


def fmt_t(seconds):
    return f"{seconds * 1e3:.3f} ms" if seconds < 1 else f"{seconds:.2f} s"


# ----------------------------------------------------------------------------- sections

def check_bare_matches(shape):
    key = jax.random.key(1)
    x_sample = make_sample(lambda x, t: toy_model(x, t), shape)(key)
    x_bare = make_bare(lambda x, t: toy_model(x, t), shape)(key)
    err = float(jnp.max(jnp.abs(x_sample - x_bare)) / jnp.max(jnp.abs(x_sample)))
    assert err < 1e-5, f"bare scan and deis_jax.sample disagree: rel err {err:.2e}"
    if torch is not None:  # the diffusers loop timed here solves the same ODE from the same noise
        noise = np.asarray(jax.random.normal(key, shape, jnp.float32))
        ref = deis_jax.sample_from_noise(toy_model, noise, config=CONFIG, num_inference_steps=STEPS)
        got = make_diffusers(toy_model, shape)(torch.from_numpy(noise)).numpy()
        derr = float(np.max(np.abs(np.asarray(ref) - got)) / np.max(np.abs(got)))
        assert derr < 1e-4, f"diffusers loop and deis_jax disagree: rel err {derr:.2e}"
        return err, derr
    return err, None


def bench_toy(repeats):
    rows = []
    for shape in SHAPES:
        key = jax.random.key(0)
        f_sample = make_sample(toy_model, shape)
        f_bare = make_bare(toy_model, shape)
        fns = {"sample": lambda: f_sample(key), "bare": lambda: f_bare(key)}
        if torch is not None:
            fns["diffusers"] = make_diffusers(toy_model, shape)
        times = interleaved(fns, repeats)
        row = dict(shape=shape, **{k: med(v) for k, v in times.items()},
                   sample_bare=paired_ratio(times, "sample", "bare"))
        if torch is not None:
            row["sample_diffusers"] = paired_ratio(times, "sample", "diffusers")
        rows.append(row)
        print(f"  toy {shape}: " + ", ".join(f"{k} {fmt_t(v) if isinstance(v, float) and k in fns else v}"
                                            for k, v in row.items()), flush=True)
    return rows


def bench_first_call(repeats):
    events = []
    jax.monitoring.register_event_duration_secs_listener(lambda name, secs, **kw: events.append((name, secs)))
    tables_cache = getattr(deis_jax.solver, "_tables", None)
    key = jax.random.key(0)
    results = {n: [] for n in FIRST_CALL_STEPS}
    for _ in range(repeats):
        for n in FIRST_CALL_STEPS:
            jax.clear_caches()
            if hasattr(tables_cache, "cache_clear"):
                tables_cache.cache_clear()
            events.clear()
            t0 = time.perf_counter()
            make_sample(toy_model, FIRST_CALL_SHAPE, n)(key).block_until_ready()
            total = time.perf_counter() - t0
            split = {"trace": 0.0, "lower": 0.0, "compile": 0.0}
            for name, secs in events:
                if name.endswith("jaxpr_trace_duration"):
                    split["trace"] += secs
                elif name.endswith("jaxpr_to_mlir_module_duration"):
                    split["lower"] += secs
                elif name.endswith("backend_compile_duration"):
                    split["compile"] += secs
            results[n].append(dict(total=total, **split))
    rows = []
    for n, runs in results.items():
        row = {"steps": n, **{k: med([r[k] for r in runs]) for k in runs[0]},
               "max": max(r["total"] for r in runs)}
        rows.append(row)
        print(f"  first call {n} steps: total {row['total']:.3f} s (trace {row['trace']:.3f}, lower "
              f"{row['lower']:.3f}, compile {row['compile']:.3f}; max {row['max']:.3f})", flush=True)
    return rows


def bench_memory():
    shape = MEMORY_SHAPE
    sample_bytes = math.prod(shape) * 4
    key = jax.random.key(0)
    noise = jnp.zeros(shape, jnp.float32)
    cases = {
        "deis_jax.sample (key -> x)": (make_sample(toy_model, shape), (key,)),
        "deis_jax.sample_from_noise (noise -> x)": (
            jax.jit(lambda z: deis_jax.sample_from_noise(toy_model, z, config=CONFIG, num_inference_steps=STEPS)),
            (noise,)),
        "bare scan (key -> x)": (make_bare(toy_model, shape), (key,)),
    }
    rows = []
    for name, (f, args) in cases.items():
        m = f.lower(*args).compile().memory_analysis()
        parts = dict(temp=m.temp_size_in_bytes, output=m.output_size_in_bytes, argument=m.argument_size_in_bytes,
                     alias=m.alias_size_in_bytes)
        total = parts["temp"] + parts["output"] + parts["argument"]
        rows.append(dict(name=name, samples=total / sample_bytes, **{k: v / sample_bytes for k, v in parts.items()}))
        print(f"  memory {name}: {total / sample_bytes:.4f} samples "
              f"(temp {parts['temp'] / sample_bytes:.4f}, out {parts['output'] / sample_bytes:.4f}, "
              f"arg {parts['argument'] / sample_bytes:.6f})", flush=True)
    return rows


def bench_real(repeats):
    n, c, h, w = REAL_SHAPE_NCHW
    shape = (n, h, w, c)  # NHWC for flax
    model_fn, params = make_flax_model(c)
    key = jax.random.key(0)
    f_sample = make_sample(model_fn, shape)
    f_bare = make_bare(model_fn, shape)
    fns = {"sample": lambda: f_sample(key, params), "bare": lambda: f_bare(key, params)}
    if torch is not None:
        tmodel = make_torch_model(c)
        fns["diffusers"] = make_diffusers(tmodel, REAL_SHAPE_NCHW)
        fns["torch model only"] = make_torch_model_only(tmodel, REAL_SHAPE_NCHW)
    times = interleaved(fns, repeats)
    row = dict({k: med(v) for k, v in times.items()}, sample_bare=paired_ratio(times, "sample", "bare"))
    if torch is not None:
        row["sample_diffusers"] = paired_ratio(times, "sample", "diffusers")
        row["diffusers_sched_share"] = 1 - paired_ratio(times, "torch model only", "diffusers")
    row["deis_sched_share"] = 1 - paired_ratio(times, "bare", "sample")
    print("  real model: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items()), flush=True)
    return row


# ----------------------------------------------------------------------------- report

def machine():
    versions = [f"jax {jax.__version__}"]
    try:
        import jaxlib
        versions.append(f"jaxlib {jaxlib.__version__}")
        import flax
        versions.append(f"flax {flax.__version__}")
    except ImportError:
        pass
    if torch is not None:
        import diffusers
        versions += [f"torch {torch.__version__} (threads {torch.get_num_threads()})",
                     f"diffusers {diffusers.__version__}"]
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "?"
    return [
        f"Date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"Machine: {platform.platform()}, {platform.machine()}, processor {platform.processor() or '?'}, "
        f"os.cpu_count() = {os.cpu_count()} (usable {affinity}); shared with other work, so timings are noisy",
        f"Python {platform.python_version()}; " + ", ".join(versions) + f"; JAX devices {jax.devices()}",
    ]


def verdict(ok):
    return "**met**" if ok else "**MISSED**"


def report(args, repeats, check, toy, first, mem, real):
    lines = ["# deis_jax speed benchmark", "", *[f"- {m}" for m in machine()],
             f"- Command: `python benchmarks/speed.py{' --quick' if args.quick else ''}`; "
             f"{repeats} interleaved timed rounds per table after 2 warm-up calls; medians; "
             "ratios are medians of per-round ratios.",
             f"- Sanity: bare scan vs deis_jax.sample max rel. diff {check[0]:.1e}"
             + (f"; diffusers loop vs deis_jax.sample_from_noise (same noise) {check[1]:.1e}" if check[1] is not None
                else ""),
             ""]
    if torch is None:
        lines += [f"diffusers/torch unavailable, skipped: {TORCH_ERROR}", ""]

    lines += ["## Near-free model `0.1 * x`, DEISConfig(solver_order=3), 20 steps", "",
              "| shape | deis_jax.sample (jit) | bare scan (jit) | diffusers (torch, 1 thread) | sample/bare "
              "| sample/diffusers |", "|---|---|---|---|---|---|"]
    for r in toy:
        d = r.get("diffusers")
        lines.append(f"| {r['shape']} | {fmt_t(r['sample'])} | {fmt_t(r['bare'])} | {fmt_t(d) if d else 'n/a'} "
                     f"| {r['sample_bare']:.2f} | {r['sample_diffusers']:.3f} |" if d else
                     f"| {r['shape']} | {fmt_t(r['sample'])} | {fmt_t(r['bare'])} | n/a | {r['sample_bare']:.2f} | n/a |")

    lines += ["", f"## First call (fresh jit after jax.clear_caches(), shape {FIRST_CALL_SHAPE})", "",
              "| steps | total (median) | trace | lower | compile | total (max) |", "|---|---|---|---|---|---|"]
    for r in first:
        lines.append(f"| {r['steps']} | {r['total']:.3f} s | {r['trace']:.3f} s | {r['lower']:.3f} s "
                     f"| {r['compile']:.3f} s | {r['max']:.3f} s |")

    lines += ["", f"## Peak memory from `compile().memory_analysis()`, shape {MEMORY_SHAPE}, in samples "
              f"({math.prod(MEMORY_SHAPE) * 4 / 2**20:.1f} MiB each)", "",
              "| function | temp | output | argument | peak = temp + output + argument |", "|---|---|---|---|---|"]
    for r in mem:
        lines.append(f"| {r['name']} | {r['temp']:.4f} | {r['output']:.4f} | {r['argument']:.6f} | {r['samples']:.4f} |")

    n, c, h, w = REAL_SHAPE_NCHW
    lines += ["", f"## Small real model (3 convs x 32 ch + time embedding), shape {REAL_SHAPE_NCHW} NCHW "
              f"/ {(n, h, w, c)} NHWC, 20 steps", "",
              "| contender | time per generation |", "|---|---|"]
    for k in ("sample", "bare", "diffusers", "torch model only"):
        if k in real:
            lines.append(f"| {k} | {fmt_t(real[k])} |")
    lines += ["", f"- sample/bare = {real['sample_bare']:.3f}; deis_jax scheduler share of the run "
              f"(1 - bare/sample) = {100 * real['deis_sched_share']:.1f}%"]
    if "sample_diffusers" in real:
        lines += [f"- sample/diffusers = {real['sample_diffusers']:.3f}; diffusers scheduler share "
                  f"(1 - model only/diffusers) = {100 * real['diffusers_sched_share']:.1f}%"]

    worst_bare = max(r["sample_bare"] for r in toy)
    firsts = {r["steps"]: r["total"] for r in first}
    growth = firsts[FIRST_CALL_STEPS[-1]] / firsts[FIRST_CALL_STEPS[0]]
    peak = mem[0]["samples"]
    lines += ["", "## Targets", "",
              f"- sample/bare <= 1.3 at every shape: worst {worst_bare:.2f} -> {verdict(worst_bare <= 1.3)}"]
    if torch is not None:
        worst_d = max(r["sample_diffusers"] for r in toy)
        lines.append(f"- sample/diffusers <= 0.5 at every shape: worst {worst_d:.3f} -> {verdict(worst_d <= 0.5)}")
    else:
        lines.append("- sample/diffusers <= 0.5: not measured (diffusers/torch unavailable)")
    lines += [f"- first call <= 3 s for 10/20/50 steps: worst median {max(firsts.values()):.2f} s -> "
              f"{verdict(max(firsts.values()) <= 3)}",
              f"- first call not growing with step count (50-step / 10-step <= 1.25): {growth:.2f} -> "
              f"{verdict(growth <= 1.25)}",
              f"- peak loop memory <= solver_order + 4 = {ORDER + 4} samples (deis_jax.sample): {peak:.4f} -> "
              f"{verdict(peak <= ORDER + 4)}"]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (smoke test)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "speed_results.md"))
    args = parser.parse_args(argv)
    repeats, first_repeats = (3, 1) if args.quick else (15, 5)

    jax.jit(lambda x: x + 1)(jnp.ones(2)).block_until_ready()  # backend start-up is not a "first call"
    print("checking the contenders agree ...", flush=True)
    check = check_bare_matches(SHAPES[0])
    print("near-free model ...", flush=True)
    toy = bench_toy(repeats)
    print("first call ...", flush=True)
    first = bench_first_call(first_repeats)
    print("memory ...", flush=True)
    mem = bench_memory()
    print("real model ...", flush=True)
    real = bench_real(repeats)
    text = report(args, repeats, check, toy, first, mem, real)
    with open(args.out, "w") as f:
        f.write(text)
    print("\n" + text + f"\nwritten to {args.out}")


if __name__ == "__main__":
    sys.exit(main())
