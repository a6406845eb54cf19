"""`python -m deis_jax demo`: sample a grid of 8x8 digits with DEIS from the bundled UNet.

Needs the optional `flax` dependency (imported lazily); runs on CPU without network.
"""

from __future__ import annotations

import argparse
import math
import struct
import time
import zlib
from typing import Any

import jax
import numpy as np

from deis_jax.config import ALGORITHM_TYPES, FINAL_SIGMAS_TYPES, MAX_SOLVER_ORDER, SOLVER_TYPES, DEISConfig
from deis_jax.published import PUBLISHED_GRIDS, published_sigmas
from deis_jax.sampling import sample
from deis_jax.solver import set_timesteps

IMAGE_SIZE = 8


def grid_size(num: int, scale: int = 4, pad: int = 2) -> tuple[int, int]:
    """(width, height) in pixels of the grid `grid_image` draws for `num` images."""
    cols = math.ceil(math.sqrt(num))
    rows = math.ceil(num / cols)
    cell = IMAGE_SIZE * scale + pad
    return cols * cell + pad, rows * cell + pad


def grid_image(images: np.ndarray, scale: int = 4, pad: int = 2) -> np.ndarray:
    """Tile [N, 8, 8, 1] images in [-1, 1] into a uint8 grid, each upscaled `scale`x, on a mid-grey border."""
    images = np.asarray(images, np.float32).reshape(-1, IMAGE_SIZE, IMAGE_SIZE)
    pixels = np.round((np.clip(images, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
    pixels = pixels.repeat(scale, axis=1).repeat(scale, axis=2)
    width, height = grid_size(len(pixels), scale, pad)
    cols, cell = (width - pad) // (IMAGE_SIZE * scale + pad), IMAGE_SIZE * scale + pad
    grid = np.full((height, width), 128, np.uint8)
    for i, img in enumerate(pixels):
        r, c = divmod(i, cols)
        grid[pad + r * cell: pad + r * cell + img.shape[0], pad + c * cell: pad + c * cell + img.shape[1]] = img
    return grid


def write_png(path: str, gray: np.ndarray) -> None:
    """Write a 2-D uint8 array as an 8-bit greyscale PNG (no imaging library needed)."""
    height, width = gray.shape

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + row.tobytes() for row in np.ascontiguousarray(gray, np.uint8))
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)))
        f.write(chunk(b"IDAT", zlib.compress(raw, 9)))
        f.write(chunk(b"IEND", b""))


def make_sampler(model, config: DEISConfig, nfe: int, num: int, sigmas: np.ndarray | None = None):
    """A jitted `key -> [num, 8, 8, 1]` DEIS sampler; the parameters are an argument, not constants.
    `sigmas`: a custom grid (then `nfe` is ignored: the grid fixes the step count)."""
    from flax import nnx

    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, key):
        net = nnx.merge(graphdef, state)
        return sample(lambda x, t: net(x, t), key, (num, IMAGE_SIZE, IMAGE_SIZE, 1), config=config,
                      num_inference_steps=None if sigmas is not None else nfe, sigmas=sigmas)

    return lambda key: run(state, key)


# --grid: a named grid (DEISConfig's spacing or sigma schedule), a published one, or a learned-grid JSON.
NAMED_GRIDS: dict[str, dict[str, Any]] = {
    "linspace": {}, "leading": {"timestep_spacing": "leading"}, "trailing": {"timestep_spacing": "trailing"},
    "quadratic": {"timestep_spacing": "quadratic"}, "karras": {"use_karras_sigmas": True},
    "exponential": {"use_exponential_sigmas": True}, "beta": {"use_beta_sigmas": True},
}


def resolve(args: argparse.Namespace) -> tuple[DEISConfig, np.ndarray | None]:
    """The config and custom grid the options ask for (the grid is None for a named grid)."""
    fields: dict[str, Any] = dict(solver_type=args.solver_type, solver_order=args.order,
                                     algorithm_type=args.algorithm_type,
                                     final_sigmas_type=args.final_sigmas_type)
    if args.grid in NAMED_GRIDS:
        return DEISConfig(**fields, **NAMED_GRIDS[args.grid]), None
    config = DEISConfig(**fields)
    if args.grid in PUBLISHED_GRIDS:
        return config, published_sigmas(args.grid, config, args.nfe)
    raise ValueError(f"--grid={args.grid!r} is invalid: must be one of {tuple(NAMED_GRIDS) + tuple(PUBLISHED_GRIDS)}.")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m deis_jax demo", description=__doc__.splitlines()[0])
    p.add_argument("--nfe", type=int, default=10,
                   help="DEIS steps (default 10) = model evaluations, except rhork: solver_order per step")
    p.add_argument("--num", type=int, default=64, help="number of digits to sample (default 64)")
    p.add_argument("--seed", type=int, default=0, help="PRNG seed of the initial noise (default 0)")
    p.add_argument("--order", type=int, default=3, choices=range(1, max(MAX_SOLVER_ORDER.values()) + 1),
                   metavar="{1..4}", help="DEIS solver order (default 3; logrho goes to 3, the others to 4)")
    p.add_argument("--solver-type", default="logrho", choices=SOLVER_TYPES, help="DEIS variant (default logrho)")
    p.add_argument("--algorithm-type", default="deis", choices=ALGORITHM_TYPES,
                   help="fit the polynomial to eps (deis, default) or to x0 (data_prediction)")
    p.add_argument("--final-sigmas-type", default="sigma_min", choices=FINAL_SIGMAS_TYPES,
                   help="end at the smallest noise level (default) or at 0 on the denoised estimate")
    p.add_argument("--grid", default="linspace", metavar="GRID",
                   help=f"step grid: one of {', '.join(NAMED_GRIDS)} (default linspace); a published grid "
                        f"({', '.join(PUBLISHED_GRIDS)}, interpolated to --nfe steps)")
    p.add_argument("--out", default="digits_grid.png", help="output PNG path (default digits_grid.png)")
    p.add_argument("--weights", default=None, help="weights .npz (default: the bundled digits_unet.npz)")
    args = p.parse_args(argv)
    if args.nfe < 1 or args.num < 1:
        p.error("--nfe and --num must be positive")
    try:
        resolve(args)
    except ValueError as e:
        p.error(str(e))
    return args


def main(argv=None) -> int:
    """Run the demo; returns 0. `argv` excludes the `demo` subcommand."""
    args = parse_args(argv)
    try:
        from deis_jax.models.unet import DEFAULT_WEIGHTS, load_digits_unet
    except ImportError as e:  # flax is optional for the library itself
        raise SystemExit(f"the demo needs flax ({e}); install it with `pip install flax`") from e

    weights = args.weights or DEFAULT_WEIGHTS
    model = load_digits_unet(weights)
    config, sigmas = resolve(args)
    sampler = make_sampler(model, config, args.nfe, args.num, sigmas)
    key = jax.random.key(args.seed)

    t0 = time.perf_counter()
    images = jax.block_until_ready(sampler(key))
    t_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    images = jax.block_until_ready(sampler(key))
    t_warm = time.perf_counter() - t0

    images = np.asarray(images)
    if not np.isfinite(images).all():
        raise SystemExit("sampling produced non-finite values")
    write_png(args.out, grid_image(images))
    width, height = grid_size(args.num)
    print(f"config: DEISConfig(solver_type={config.solver_type!r}, solver_order={config.solver_order}, "
          f"algorithm_type={config.algorithm_type!r}, final_sigmas_type={config.final_sigmas_type!r}, "
          f"beta_schedule={config.beta_schedule!r} {config.beta_start}..{config.beta_end}, "
          f"num_train_timesteps={config.num_train_timesteps}, prediction_type={config.prediction_type!r}); "
          f"grid {args.grid!r}")
    if sigmas is not None:
        print(f"sigmas: {np.array2string(np.asarray(sigmas), precision=4)}")
    print(f"model: DigitsUNet from {weights}")
    steps = None if sigmas is not None else args.nfe
    evaluations = set_timesteps(config, steps, (1,), sigmas=sigmas).num_inference_steps
    print(f"sampled {args.num} digits of 8x8 with NFE={evaluations} (seed {args.seed}) on "
          f"{jax.default_backend()}, under jax.jit")
    print(f"first call (compile + run): {t_first:.3f}s; second (warm) call: {t_warm:.3f}s")
    print(f"wrote {args.out} ({width}x{height} px, each digit drawn at 32x32)")
    return 0
