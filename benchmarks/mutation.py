"""Mutation testing of deis_jax (issue #13): how many small code changes does the fast test subset catch?

Mutants come from mutmut 2.x's operators (`pip install "mutmut<3"`; its own runner is not used: mutmut 3
forks a process that has imported JAX, which can hang). Each mutant is written into a private copy of the
repository and judged by a fresh `pytest -x` subprocess on that module's test selection (MODULES), with
torch and diffusers blocked so their parity tests skip (tests/test_golden.py checks parity without them).
A mutant is killed when pytest fails, survives when it passes, times out after `--timeout-factor` times the
unmutated run plus 30 s. Not run in CI (too slow); results go to benchmarks/mutation_results.{md,json}.

    python benchmarks/mutation.py coefficients solver --sample 60 --seed 0 --jobs 2
"""

import argparse
import concurrent.futures
import difflib
import json
import os
import queue
import random
import shutil
import subprocess
import sys
import tempfile
import time

from mutmut import Context, list_mutations, mutate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COPIED = ["deis_jax", "tests", "benchmarks", "README.md", "pyproject.toml"]
# Fast tests that exercise each module; the golden-file tests first, they kill most mutants in seconds.
# (The results in mutation_results.md were run without the files marked "+": those killed the survivors
# listed there as "killed by the wider suite".)
MODULES = {
    "coefficients": ["tests/test_golden.py", "tests/test_coefficients.py", "tests/test_variants.py"],  # +variants
    "solver": ["tests/test_golden.py", "tests/test_thresholding.py", "tests/test_edge_cases.py",
               "tests/test_sampling.py", "tests/test_reliability.py"],  # +sampling, +reliability
    "spacing": ["tests/test_golden.py", "tests/test_spacing.py"],
    "sampling": ["tests/test_sampling.py", "tests/test_flax_usage.py"],  # +flax_usage
}
RUNNER = (
    "import sys; sys.modules['torch'] = None; sys.modules['diffusers'] = None; import pytest; "
    "sys.exit(pytest.main(['-q', '-x', '-p', 'no:cacheprovider', *sys.argv[1:]]))"
)


def run_tests(copy: str, tests: list[str], timeout: float) -> tuple[str, float]:
    """('killed' | 'survived' | 'timeout', seconds) of the test selection in one repository copy."""
    # A shared persistent compilation cache (keyed by the compiled program) skips recompiling unchanged code.
    env = dict(os.environ, PYTHONPATH=copy, JAX_COMPILATION_CACHE_DIR=os.path.join(os.path.dirname(copy), "jax"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-c", RUNNER, *tests], cwd=copy, env=env, timeout=timeout,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired:
        return "timeout", time.perf_counter() - start
    return ("survived" if proc.returncode == 0 else "killed"), time.perf_counter() - start


def mutants(path: str, sample: int | None, seed: int):
    """(all mutants, the [seeded] sample of them as (id, line number, diff lines, mutated source))."""
    with open(path) as f:
        source = f.read()
    ids = list_mutations(Context(source=source, filename=path))
    chosen = sorted(random.Random(seed).sample(range(len(ids)), sample)) if sample and sample < len(ids) \
        else range(len(ids))
    out = []
    for k in chosen:
        new, _ = mutate(Context(source=source, mutation_id=ids[k], filename=path))
        diff = [d for d in difflib.unified_diff(source.splitlines(), new.splitlines(), lineterm="", n=0)
                if d[:1] in "+-" and d[:3] not in ("+++", "---")]
        out.append((k, ids[k].line_number + 1, diff, new))
    return len(ids), out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("modules", nargs="*", default=list(MODULES), choices=list(MODULES))
    parser.add_argument("--sample", type=int, default=None, help="mutants per module (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--timeout-factor", type=float, default=3.0)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "mutation_results"))
    args = parser.parse_args()

    copies = queue.Queue()
    tmp = tempfile.mkdtemp(prefix="deis-mutation-")
    for j in range(args.jobs):
        dst = os.path.join(tmp, str(j))
        for name in COPIED:
            src = os.path.join(ROOT, name)
            (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, os.path.join(dst, name))
        copies.put(dst)

    results, started = [], time.perf_counter()
    for module in args.modules:
        rel = f"deis_jax/{module}.py"
        tests = MODULES[module]
        status, base = run_tests(copies.queue[0], tests, timeout=1800)
        if status != "survived":
            sys.exit(f"{module}: the unmutated test selection fails")
        total, chosen = mutants(os.path.join(ROOT, rel), args.sample, args.seed)
        print(f"{module}: {len(chosen)} of {total} mutants, unmutated run {base:.0f}s", flush=True)

        def judge(item, module=module, rel=rel, tests=tests, base=base):
            index, line, diff, new = item
            copy = copies.get()
            try:
                with open(os.path.join(copy, rel), "w") as f:
                    f.write(new)
                status, seconds = run_tests(copy, tests, timeout=args.timeout_factor * base + 30)
            finally:
                shutil.copy(os.path.join(ROOT, rel), os.path.join(copy, rel))
                copies.put(copy)
            print(f"  {status:8s} {seconds:5.1f}s  {module}:{line}  #{index}  {' / '.join(diff)}", flush=True)
            return dict(module=module, index=index, line=line, diff=diff, status=status, seconds=seconds)

        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            results += [dict(r, total=total) for r in pool.map(judge, chosen)]
    shutil.rmtree(tmp)

    rows = ["| module | mutants | run | killed | timeout | survived | kill rate |", "|---|---|---|---|---|---|---|"]
    for module in args.modules:
        rs = [r for r in results if r["module"] == module]
        n = {s: sum(r["status"] == s for r in rs) for s in ("killed", "timeout", "survived")}
        rate = (n["killed"] + n["timeout"]) / max(len(rs), 1)
        rows.append(f"| {module} | {rs[0]['total'] if rs else 0} | {len(rs)} | {n['killed']} | {n['timeout']} "
                    f"| {n['survived']} | {rate:.0%} |")
    survivors = [f"- `{r['module']}.py:{r['line']}` (#{r['index']}): `{' / '.join(r['diff'])}`"
                 for r in results if r["status"] == "survived"]
    command = " ".join(["python benchmarks/mutation.py", *args.modules] +
                       ([f"--sample {args.sample}"] if args.sample else []) + [f"--seed {args.seed}"])
    report = "\n".join([f"# Mutation testing\n\n`{command}`, {time.perf_counter() - started:.0f}s wall.\n",
                        *rows, "\nSurvivors:\n", *survivors]) + "\n"
    print(report)
    with open(args.out + ".md", "w") as f:
        f.write(report)
    with open(args.out + ".json", "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
