"""Command line: `python -m deis_jax demo [options]` (see `deis_jax.demo`)."""

import sys

USAGE = """usage: python -m deis_jax demo [--nfe 10] [--num 64] [--seed 0] [--order 3] [--out digits_grid.png]

commands:
  demo    sample a grid of 8x8 digits with DEIS from the bundled UNet (needs flax)
"""


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "demo":
        from deis_jax.demo import main as demo_main

        return demo_main(argv[1:])
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0
    print(USAGE, end="", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
