"""Many devices: pmap, Auto and Explicit meshes, `jax.set_mesh`, hand-written loops, and a
2-process `jax.distributed` run, each compared with a one-device run of the same call.

JAX fixes its devices when it starts and other test modules import it first, so the checks run
in subprocesses: one with 4 CPU devices runs every single-process check (each reported as its
own test), and two with 2 CPU devices each form the multi-process run.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

import deis_jax as dj
from helpers import toy_model

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
STEPS = 10
CONFIG = dj.DEISConfig(solver_order=3)


def _env(devices: int) -> dict:
    path = os.pathsep.join([ROOT, TESTS, os.environ.get("PYTHONPATH", "")])
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
                PYTHONPATH=path)


FOUR_DEVICES = r"""
import json, traceback
import jax, jax.numpy as jnp, numpy as np
from jax.experimental import checkify
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
import deis_jax as dj
from helpers import toy_model

assert jax.device_count() == 4
CONFIG, N = dj.DEISConfig(solver_order=3), 10
explicit = jax.make_mesh((4,), ("data",), axis_types=(AxisType.Explicit,))
auto = Mesh(np.array(jax.devices()), ("data",), axis_types=(AxisType.Auto,))
noise = np.random.RandomState(0).randn(8, 3).astype(np.float32)
nan_model = lambda x, t: jnp.where(t < 500, jnp.nan, toy_model(x, t))  # NaN from the first step with t < 500
first_nan = int(np.argmax(np.asarray(dj.set_timesteps(CONFIG, N, (1,)).timesteps) < 500))
results = {}


def check(fn):
    try:
        fn()
        results[fn.__name__] = "OK"
    except Exception:
        results[fn.__name__] = traceback.format_exc()[-4000:]


def solve(z, model=toy_model, **kw):
    return dj.sample_from_noise(model, z, config=CONFIG, num_inference_steps=N, **kw)


def one_device(fn, *arrays):
    # The reference: the same call on unsharded numpy inputs, on one device.
    return np.asarray(fn(*(np.asarray(a) for a in arrays)))


def assert_sharded_like(out, ref, like):
    assert out.sharding.is_equivalent_to(like.sharding, out.ndim), (out.sharding, like.sharding)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-6, atol=1e-6)


def put(x, mesh, spec=P("data")):
    return jax.device_put(x, NamedSharding(mesh, spec))


def jit_on(mesh, spec=P("data"), x=noise, **kw):
    z = put(x, mesh, spec)
    fn = jax.jit(lambda z: solve(z, **kw))
    assert_sharded_like(fn(z), one_device(lambda z: solve(z, **kw), x), z)
    hlo = fn.lower(z).compile().as_text()  # elementwise per sample: no communication between devices
    assert not any(op in hlo for op in ("all-reduce", "all-gather", "all-to-all", "collective-permute")), hlo


@check
def pmap():
    keys = jax.random.split(jax.random.key(0), 4)
    fn = lambda k: dj.sample(toy_model, k, (2, 3), config=CONFIG, num_inference_steps=N)
    ref = np.stack([fn(k) for k in keys])
    np.testing.assert_allclose(jax.pmap(fn)(keys), ref, rtol=1e-6, atol=1e-6)


@check
def auto_mesh():
    jit_on(auto)


@check
def explicit_mesh():
    jit_on(explicit)
    # The history is resharded once, before the loop; the scan body has no reshard.
    jaxpr = str(jax.make_jaxpr(solve)(put(noise, explicit)))
    assert jaxpr.count("reshard") == 1 and jaxpr.index("reshard") < jaxpr.index("scan["), jaxpr
    jit_on(explicit, remat=True)
    # A model whose output is replicated: eps takes the sample's sharding before the history write.
    replicated = lambda x, t: jax.sharding.reshard(toy_model(x, t), NamedSharding(explicit, P()))
    z = put(noise, explicit)
    assert_sharded_like(jax.jit(lambda z: solve(z, replicated))(z), one_device(solve, noise), z)


@check
def explicit_mesh_two_axes():
    mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    jit_on(mesh, P("data", "model"), np.random.RandomState(1).randn(4, 6).astype(np.float32))


@check
def set_mesh_context():
    key = jax.random.key(2)
    ref = one_device(lambda: dj.sample(toy_model, key, (8, 3), config=CONFIG, num_inference_steps=N))
    with jax.set_mesh(explicit):
        jit_on(explicit)
        # A sharded `sample`: draw the noise with out_sharding, then sample_from_noise.
        z = jax.random.normal(key, (8, 3), out_sharding=P("data"))
        assert_sharded_like(jax.jit(solve)(z), ref, z)
        # `sample` itself runs under the mesh (its noise, and so its result, is replicated).
        out = jax.jit(lambda k: dj.sample(toy_model, k, (8, 3), config=CONFIG, num_inference_steps=N))(key)
        np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-6, atol=1e-6)


@check
def img2img_explicit():
    image = np.random.RandomState(3).randn(8, 3).astype(np.float32)
    fn = lambda im, z: dj.img2img(toy_model, im, z, strength=0.6, config=CONFIG, num_inference_steps=N)
    im = put(image, explicit)
    assert_sharded_like(jax.jit(fn)(im, put(noise, explicit)), one_device(fn, image, noise), im)


@check
def guidance_explicit():
    guided = dj.classifier_free_guidance(lambda x, t, c: toy_model(x, t) + c, guidance_scale=3.0)
    cond, uncond = np.full((8, 1), 0.5, np.float32), np.zeros((8, 1), np.float32)
    fn = lambda z, c, u: solve(z, lambda x, t: guided(x, t, c, u))
    z = put(noise, explicit)
    out = jax.jit(fn)(z, put(cond, explicit), put(uncond, explicit))
    assert_sharded_like(out, one_device(fn, noise, cond, uncond), z)


@check
def check_finite_explicit():
    z = put(noise, explicit)
    err, out = checkify.checkify(jax.jit(lambda z: solve(z, check_finite=True)))(z)
    err.throw()
    assert_sharded_like(out, one_device(solve, noise), z)
    err, _ = checkify.checkify(jax.jit(lambda z: solve(z, nan_model, check_finite=True)))(z)
    try:
        err.throw()
    except dj.NonFiniteError as e:
        assert f"model output became non-finite (NaN or inf) at step {first_nan} " in str(e), str(e)
    else:
        raise AssertionError("no NonFiniteError")


@check
def sde_meshes():
    # Stochastic sampling: the per-step noise is drawn with the sample's sharding (threefry is partitionable:
    # the same values as on one device), without communication.
    kw = dict(eta=1.0, key=jax.random.key(5))
    jit_on(auto, **kw)
    jit_on(explicit, **kw)
    mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    jit_on(mesh, P("data", "model"), np.random.RandomState(1).randn(4, 6).astype(np.float32), **kw)


def loop_of_step(step, z):
    state = dj.set_timesteps(CONFIG, N, z.shape)
    for t in state.timesteps:
        z, state = step(state, toy_model(z, t), t, z)
    return z


def scan_of_step(z, prepare=False):
    state = dj.set_timesteps(CONFIG, N, z.shape)  # outside jit, as a user would
    if prepare:
        state = dj.with_sample_sharding(state, z)

    @jax.jit
    def run(state, z):
        def body(carry, t):
            z, state = carry
            return dj.step(state, toy_model(z, t), t, z), None

        return jax.lax.scan(body, (z, state), state.timesteps)[0][0]

    return run(state, z)


@check
def python_loop_of_step():
    z = put(noise, explicit)
    assert_sharded_like(loop_of_step(dj.step, z), one_device(solve, noise), z)


@check
def python_loop_of_jitted_step():
    z = put(noise, explicit)
    assert_sharded_like(loop_of_step(jax.jit(dj.step), z), one_device(solve, noise), z)


@check
def user_scan_of_step():
    z = put(noise, explicit)
    assert_sharded_like(scan_of_step(z), one_device(solve, noise), z)


@check
def user_scan_of_step_under_set_mesh():
    # The state made under the mesh has a replicated history typed on that mesh; a scan carry
    # keeps its type, so the history must take the sample's sharding before the scan.
    z = put(noise, explicit)
    with jax.set_mesh(explicit):
        try:
            scan_of_step(z)
        except TypeError as e:
            assert "carry[1].model_outputs has type float32[3,8,3]" in str(e), str(e)
        else:
            raise AssertionError("the scan accepted a carry whose sharding changes")
        out = scan_of_step(z, prepare=True)
    assert_sharded_like(out, one_device(solve, noise), z)


print("RESULTS " + json.dumps(results))
"""

CHECKS = ["pmap", "auto_mesh", "explicit_mesh", "explicit_mesh_two_axes", "set_mesh_context", "img2img_explicit",
          "sde_meshes",
          "guidance_explicit", "check_finite_explicit", "python_loop_of_step", "python_loop_of_jitted_step",
          "user_scan_of_step", "user_scan_of_step_under_set_mesh"]


@pytest.fixture(scope="module")
def four_devices():
    result = subprocess.run([sys.executable, "-c", FOUR_DEVICES], env=_env(4), cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULTS ")]
    assert result.returncode == 0 and lines, result.stderr[-4000:]
    results = json.loads(lines[-1][len("RESULTS "):])
    assert sorted(results) == sorted(CHECKS)
    return results


@pytest.mark.parametrize("name", CHECKS)
def test_on_four_devices(four_devices, name):
    assert four_devices[name] == "OK", four_devices[name]


DISTRIBUTED = r"""
import sys
import jax, numpy as np
process_id, port, out_path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id,
                           initialization_timeout=60)
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
import deis_jax as dj
from helpers import toy_model

assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2
noise = np.random.RandomState(0).randn(8, 3).astype(np.float32)  # the global batch
local_noise = noise[4 * process_id:4 * (process_id + 1)]  # this host's half
shards = {}
for kind in (AxisType.Explicit, AxisType.Auto):
    mesh = Mesh(np.array(jax.devices()), ("batch",), axis_types=(kind,))
    x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("batch")), local_noise)
    out = jax.jit(lambda z: dj.sample_from_noise(toy_model, z, config=dj.DEISConfig(solver_order=3),
                                                 num_inference_steps=10))(x)
    assert out.sharding.is_equivalent_to(x.sharding, 2), out.sharding
    for shard in out.addressable_shards:
        shards[f"{kind.name}/{shard.index[0].start}"] = np.asarray(shard.data)
np.savez(out_path, **shards)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_distributed_run_equals_one_process(tmp_path):
    """The README's multi-host recipe on two local processes (2 CPU devices each)."""
    port = _free_port()
    paths = [tmp_path / f"process{i}.npz" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", DISTRIBUTED, str(i), str(port), str(paths[i])], env=_env(2),
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    try:
        logs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    noise = np.random.RandomState(0).randn(8, 3).astype(np.float32)
    ref = np.asarray(dj.sample_from_noise(toy_model, noise, config=CONFIG, num_inference_steps=STEPS))
    for kind in ("Explicit", "Auto"):
        rows = []
        for path in paths:
            with np.load(path) as shards:
                for name in shards.files:
                    if name.startswith(kind + "/"):
                        start = int(name.split("/")[1])
                        np.testing.assert_allclose(shards[name], ref[start:start + 2], rtol=1e-6, atol=1e-6)
                        rows.append(start)
        assert sorted(rows) == [0, 2, 4, 6], (kind, rows)
