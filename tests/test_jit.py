"""How kernels are compiled and run (spotfit._jit): the cache key covers every kernel module,
the first-run notice appears only when something compiles, and ranges of windows on threads
give the same numbers as one thread.

The first fit after installation (seconds, with the notice) is measured by
``benchmarks/first_run.py``: compiling everything takes too long for the suite.
"""

import ast
import os
import pathlib
import re
import shutil
import subprocess
import sys

import numba
import numpy as np
import pytest

from spotfit import _jit

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "spotfit"


def _uses_njit(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return any(isinstance(node, ast.ImportFrom) and node.module == "spotfit._jit"
               and any(a.name == "njit" for a in node.names) for node in ast.walk(tree))


def test_kernel_modules_are_exactly_the_modules_with_kernels():
    with_kernels = {p.name for p in PACKAGE.glob("*.py") if _uses_njit(p)}
    assert with_kernels == set(_jit.KERNEL_MODULES)
    for path in PACKAGE.rglob("*.py"):  # and none decorates with numba's own njit
        if path.name == "_jit.py":
            continue
        text = path.read_text(encoding="utf-8")
        assert "from numba import njit" not in text and "numba.njit" not in text, path


def test_cache_stamp_changes_when_any_kernel_module_changes(tmp_path):
    for name in _jit.KERNEL_MODULES:
        shutil.copy(PACKAGE / name, tmp_path / name)
    before = _jit.kernel_stamp(tmp_path)
    assert before == _jit.kernel_stamp(PACKAGE)
    for name in ("filters.py", "_kernels.py"):  # a callee's file, the solver's file
        path = tmp_path / name
        original = path.read_bytes()
        path.write_bytes(original + b"\n# changed\n")
        assert _jit.kernel_stamp(tmp_path) != before
        path.write_bytes(original)
    assert _jit.kernel_stamp(tmp_path) == before


def test_spotfit_kernels_are_cached_under_the_shared_stamp():
    from spotfit import _kernels, detection

    for kernel in (_kernels.levenberg_marquardt, detection._is_box_maximum):
        locator = kernel._cache._impl.locator
        assert type(locator).__name__.startswith("Spotfit")
        assert locator.get_source_stamp() == _jit.kernel_stamp()


def _compile_something(module_name):
    """A fresh function compiled now (no cache), as if defined in ``module_name``."""
    def twice(x):
        return 2 * x

    twice.__module__ = module_name
    return _jit.njit(cache=False)(twice)(21)


def test_notice_once_when_a_spotfit_kernel_compiles(monkeypatch, capsys):
    monkeypatch.setitem(_jit._state, "announced", False)
    monkeypatch.setitem(_jit._state, "alongside", None)
    monkeypatch.setitem(_jit._state, "announce", True)
    _compile_something("not_spotfit.module")
    assert capsys.readouterr().err == ""  # other packages' compilations: not ours to announce
    assert _compile_something("spotfit.example") == 42
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err == _jit.NOTICE + "\n"
    _compile_something("spotfit.example")
    assert capsys.readouterr().err == ""  # once per process


def test_no_notice_unless_asked(monkeypatch, capsys):
    monkeypatch.setitem(_jit._state, "announced", False)
    monkeypatch.setitem(_jit._state, "alongside", None)
    monkeypatch.setitem(_jit._state, "announce", False)
    _compile_something("spotfit.example")
    assert capsys.readouterr().err == ""


def test_cli_notice_only_on_a_cache_miss(tmp_path):
    """`spotfit render` compiles one small kernel: with an empty cache the notice is
    the first line on stderr, from the cache there is none; stdout stays clean."""
    table = tmp_path / "spots.csv"
    table.write_text("x,y\n5.0,6.0\n10.5,3.25\n")
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    env.pop("SPOTFIT_COMPILE_NOTICE", None)  # (tests/conftest.py switches it off)
    command = [sys.executable, "-m", "spotfit", "render", str(table), "-o", str(tmp_path / "r.tif"),
               "--pixel-size", "50", "--camera-pixel-size", "100", "--sigma", "20"]
    first = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    again = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    assert first.stderr.startswith(_jit.NOTICE)
    assert first.stderr.count("Compiling") == 1
    assert "Compiling" not in first.stdout + again.stdout + again.stderr


@pytest.mark.parametrize("threads", [2, 3])
def test_threaded_window_ranges_match_one_thread(threads):
    from spotfit.models import Grid, get_model

    rng = np.random.default_rng(5)
    n = 4 * _jit.MIN_THREADED_WINDOWS + 3  # uneven ranges
    grid = Grid((1, 9, 11))
    model = get_model("rotated")
    theta = np.column_stack([rng.uniform(100, 1000, n), rng.uniform(3, 7, n), rng.uniform(3, 5, n),
                             rng.uniform(1, 3, n), rng.uniform(1, 3, n), rng.uniform(-0.5, 0.5, n),
                             rng.uniform(0, 10, n)])
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        mu1, jac1 = model.evaluate(theta, grid)
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        mu2, jac2 = model.evaluate(theta, grid)
    finally:
        numba.set_num_threads(before)
    np.testing.assert_array_equal(mu1, mu2)
    np.testing.assert_array_equal(jac1, jac2)


def test_compile_kernels_compiles_what_fits_use(monkeypatch):
    """The second process of a first run compiles the covariance kernel (which also
    computes the score statistic) for the argument types fits pass (else the run would
    compile it again)."""
    import spotfit
    from spotfit import _kernels, solver
    from spotfit.camera import Camera

    seen = {}
    run = solver.over_windows

    def recording(kernel, n, *args, **kw):
        if kernel is _kernels.covariance:
            seen.setdefault(kernel.__name__, set()).add(tuple(numba.typeof(a) for a in args))
        return run(kernel, n, *args, **kw)

    monkeypatch.setattr(solver, "over_windows", recording)
    solver.compile_kernels()
    compiled, seen = seen, {}
    assert set(compiled) == {"covariance"}
    assert all(len(types) == 1 for types in compiled.values())
    camera = Camera(baseline=100.0, gain=2.0, read_noise=1.5)
    image, _ = spotfit.simulate((40, 52), n_spots=4, photons=(300, 3000), camera=camera,
                                min_separation=10, border=5, seed=3)
    spotfit.fit(image, camera=camera)  # photons, mle (faint spots: bias correction)
    spotfit.fit(image, camera=Camera(baseline=100.0))  # ADU, lsq, measured noise
    assert seen == compiled


def test_kernel_threads_are_kept_between_calls_and_errors_reach_the_caller():
    """over_windows reuses one pool of threads (a dense field makes hundreds of
    calls), covers every window exactly once, and re-raises a kernel's error."""
    before = numba.get_num_threads()
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs 2 threads")
    n = 3 * _jit.MIN_THREADED_WINDOWS + 5
    try:
        numba.set_num_threads(2)
        seen = np.zeros(n, np.int64)

        def count(out, start, stop):
            out[start:stop] += 1

        _jit.over_windows(count, n, seen)
        pool = _jit._POOL["pool"]
        _jit.over_windows(count, n, seen)
        assert _jit._POOL["pool"] is pool
        np.testing.assert_array_equal(seen, 2)

        def fail(start, stop):
            if start > 0:
                raise ValueError("window range failed")

        with pytest.raises(ValueError, match="window range failed"):
            _jit.over_windows(fail, n)
    finally:
        numba.set_num_threads(before)


def test_few_large_joint_fits_run_on_threads_few_small_ones_do_not():
    from spotfit import solver

    assert not solver._threaded(1, 10_000, 26)
    assert not solver._threaded(20, 64, 5)
    assert solver._threaded(_jit.MIN_THREADED_WINDOWS, 49, 5)
    assert solver._threaded(15, 400, 26)  # eight emitters in a 20 x 20 window

class _Running:
    """A stand-in for the second compiling process: running until waited for."""

    def __init__(self):
        self.waited = False

    def poll(self):
        return 0 if self.waited else None

    def wait(self, timeout=None):
        self.waited = True
        return 0


def test_join_compiles_the_meanwhile_kernels_while_the_second_process_runs(monkeypatch):
    """join_alongside runs the `meanwhile` function here first (whose own kernel call
    joins again: that must not wait), then waits for the second process, once."""
    calls = []
    helper = _Running()

    def meanwhile():
        calls.append(("meanwhile", helper.waited))
        _jit.join_alongside()  # as score_test does: returns at once
        calls.append(("inner join returned", helper.waited))

    monkeypatch.setattr(_jit, "_call", lambda target: meanwhile())
    monkeypatch.setitem(_jit._state, "helper", helper)
    monkeypatch.setitem(_jit._state, "meanwhile", "m:f")
    _jit.join_alongside()
    assert calls == [("meanwhile", False), ("inner join returned", False)]
    assert helper.waited and _jit._state["helper"] is None and _jit._state["meanwhile"] is None
    _jit.join_alongside()  # nothing left to wait for or compile
    assert len(calls) == 2


def test_join_does_not_compile_meanwhile_when_the_second_process_is_done(monkeypatch):
    helper = _Running()
    helper.waited = True  # finished
    monkeypatch.setattr(_jit, "_call", lambda target: pytest.fail("compiled although not waiting"))
    monkeypatch.setitem(_jit._state, "helper", helper)
    monkeypatch.setitem(_jit._state, "meanwhile", "m:f")
    _jit.join_alongside()
    assert _jit._state["helper"] is None


def test_cold_cache_means_no_index_file_for_the_kernel(monkeypatch, tmp_path):
    """The second process starts at once only when numba's in-tree cache surely
    lacks the kernel; with NUMBA_CACHE_DIR (another folder) it waits for a cache miss."""
    package = tmp_path / "spotfit"
    (package / "__pycache__").mkdir(parents=True)
    (package / "_kernels.py").write_text("# kernels\n")
    os.utime(package / "_kernels.py", (1e9, 1e9))
    monkeypatch.setattr(_jit, "_PACKAGE", str(package))
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    target = "spotfit.solver:compile_covariance_kernel"
    assert _jit._cold(target)
    (package / "__pycache__" / "_kernels.levenberg_marquardt-520.py311.nbi").write_bytes(b"")
    assert _jit._cold(target)  # another kernel's entry
    (package / "__pycache__" / "_kernels.covariance-623.py311.nbi").write_bytes(b"")
    assert not _jit._cold(target)
    # (explicit times: "now" twice can be the same file-system tick)
    os.utime(package / "_kernels.py", (2e9, 2e9))  # sources newer than the entry: an upgrade
    assert _jit._cold(target)
    os.utime(package / "__pycache__" / "_kernels.covariance-623.py311.nbi", (3e9, 3e9))
    assert not _jit._cold(target)
    assert not _jit._cold("spotfit.solver:compile_kernels")  # the name does not say which
    (package / "__pycache__" / "_kernels.covariance-623.py311.nbi").unlink()
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert not _jit._cold(target)


def _index_file(path, stamp):
    """An index file as numba writes it: its format version, then the pickled
    ``(stamp, overloads)``."""
    import pickle

    with open(path, "wb") as f:
        pickle.dump(("0.68.1",), f, protocol=-1)
        f.write(pickle.dumps((stamp, {((), "cpu"): "x.1.nbc"}), protocol=-1))


def test_an_older_entry_written_for_these_sources_is_not_cold(monkeypatch, tmp_path):
    """Sources dated after their cache entries with the same text (a reinstall of the
    same version, a checkout): the entries are valid (the stamp is the sources' hash),
    so no second process is started on every run; an older entry of other sources
    (an upgrade) still means cold."""
    import numba

    package = tmp_path / "spotfit"
    cache = package / "__pycache__"
    cache.mkdir(parents=True)
    for name in _jit.KERNEL_MODULES:
        (package / name).write_text(f"# {name}\n")
    monkeypatch.setattr(_jit, "_PACKAGE", str(package))
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    target = "spotfit.solver:compile_covariance_kernel"
    entry = cache / "_kernels.covariance-623.py311.nbi"
    _index_file(entry, "0" * 64)  # written for other sources
    os.utime(entry, (1e9, 1e9))
    assert _jit._cold(target)
    _index_file(entry, _jit.kernel_stamp(str(package)))  # for these sources, then redated
    os.utime(entry, (1e9, 1e9))
    assert _jit._cold("spotfit.solver:compile_quadrupole_score_kernel")  # another kernel's
    assert not _jit._cold(target)
    # the stamp without numba imported: numba's version from its distribution's metadata
    from importlib import metadata

    assert _jit.kernel_stamp(str(package), metadata.version("numba")) == _jit.kernel_stamp(str(package))
    monkeypatch.delitem(sys.modules, "numba")
    assert not _jit._cold(target)
    monkeypatch.setitem(sys.modules, "numba", numba)
    (package / "group.py").write_text("# changed\n")  # an upgrade: the old entry is stale
    assert _jit._cold(target)


def test_solver_compile_targets_exist():
    """The CLI names the second process' function by a string."""
    import inspect

    from spotfit import cli, solver

    from spotfit import single

    source = inspect.getsource(cli)
    for module, name in ((solver, "compile_covariance_kernel"), (single, "compile_quadrupole_kernel")):
        assert f"{module.__name__}:{name}" in source
        assert callable(getattr(module, name))


def test_compile_quadrupole_kernel_compiles_what_fits_use(monkeypatch):
    """The score gate's kernel, compiled while the first run waits for the second process,
    gets the argument types fits pass it (else the fit would compile it again)."""
    import spotfit
    from spotfit import _kernels, single
    from spotfit.camera import Camera

    seen = set()
    kernel = _kernels.quadrupole_score

    def recording(*args):
        seen.add(tuple(numba.typeof(a) for a in args))
        return kernel(*args)

    monkeypatch.setattr(_kernels, "quadrupole_score", recording)
    single.compile_quadrupole_kernel()
    compiled, seen = set(seen), set()
    assert len(compiled) == 1
    camera = Camera(baseline=100.0, gain=2.0, read_noise=1.5)
    image, _ = spotfit.simulate((40, 52), n_spots=4, photons=(300, 3000), camera=camera,
                                min_separation=10, border=5, seed=3)
    spotfit.fit(image, camera=camera)
    spotfit.fit(image, camera=Camera(baseline=100.0))
    assert seen == compiled, (seen, compiled)


@pytest.mark.parametrize("early, cold, started", [(True, True, True), (True, False, False),
                                                  (False, True, False)])
def test_second_process_starts_at_once_only_on_a_cold_cache(monkeypatch, early, cold, started):
    calls = []
    monkeypatch.setattr(_jit, "_cold", lambda target: cold)
    monkeypatch.setattr(_jit, "_start_helper", lambda target: calls.append(target))
    monkeypatch.setitem(_jit._state, "helper", None)
    monkeypatch.setitem(_jit._state, "announced", False)
    monkeypatch.setitem(_jit._state, "alongside", None)
    monkeypatch.setitem(_jit._state, "meanwhile", None)
    _jit.compile_alongside("spotfit.solver:compile_covariance_kernel", early=early)
    assert calls == (["spotfit.solver:compile_covariance_kernel"] if started else [])


@pytest.mark.parametrize("name", ["wlsq", "mle"])
def test_read_only_pixel_variance_gives_the_kernels_the_same_types(name):
    """A per-pixel read variance (broadcast: a read-only view) must not make the cost
    another type to numba than a scalar one (a z-stack fit compiled the solver's
    kernels a second time); same values either way."""
    from spotfit.estimators import Noise, get_estimator

    rng = np.random.default_rng(3)
    data = rng.poisson(20.0, (4, 25)).astype(float)
    mask = np.ones(data.shape, bool)
    read_var = rng.uniform(1.0, 3.0, data.shape)
    frozen = read_var.copy()
    frozen.flags.writeable = False
    estimator = get_estimator(name)
    scalar = numba.typeof(estimator.cost(data, mask, Noise(True, 1.0, 2.0)))  # a 2D fit's
    free = estimator.cost(data, mask, Noise(True, 1.0, read_var))
    ro = estimator.cost(data, mask, Noise(True, 1.0, frozen))
    assert numba.typeof(ro) == numba.typeof(free) == scalar
    for a, b in zip(ro, free):
        np.testing.assert_array_equal(a, b)


def test_kernel_threads_are_set_without_launching_numbas_threads():
    """FitConfig.use_threads keeps the count without launching numba's thread pool
    (which the fit kernels do not use); once numba's threads run, numba's count rules."""
    code = """
import numba
import numba.np.ufunc.parallel as parallel
from spotfit import _jit
most = numba.config.NUMBA_NUM_THREADS
assert _jit.kernel_threads() == most
_jit.set_kernel_threads(1)
assert _jit.kernel_threads() == 1 and not parallel._is_initialized
_jit.set_kernel_threads(10 ** 6)
assert _jit.kernel_threads() == most
numba.set_num_threads(1)  # launches numba's threads: their count from now on
assert _jit.kernel_threads() == 1
_jit.set_kernel_threads(most)
assert numba.get_num_threads() == most == _jit.kernel_threads()
print("ok")
"""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


_ONE_SIGNATURE = """
import sys
import numpy as np
import spotfit
from numba.core.dispatcher import Dispatcher
from spotfit.camera import Camera

camera = Camera(baseline=100.0, gain=2.0, read_noise=1.5)
image, _ = spotfit.simulate((40, 52), n_spots=4, photons=(300, 3000), camera=camera,
                            min_separation=10, border=5, seed=3)
stack, _ = spotfit.simulate((9, 40, 52), n_spots=3, photons=1500, background=10, sigma=1.3,
                            sigma_z=2.0, z_stack=True, camera=camera, min_separation=10, seed=4)
frozen = stack.astype(np.float32)
frozen.flags.writeable = False
no_read_noise = Camera(baseline=100.0, gain=2.0)
for img, axes in ((image, None), (stack, "ZYX"), (frozen, "ZYX")):
    for cam in (camera, no_read_noise):
        spotfit.fit(img, camera=cam, axes=axes)  # photons, mle
    spotfit.fit(img, camera=Camera(baseline=100.0), axes=axes)  # ADU, lsq, measured noise
spotfit.fit(image, camera=camera, select_model=False)
used = {}
for name, module in list(sys.modules.items()):
    if name.startswith("spotfit") and module is not None:
        for value in vars(module).values():
            if isinstance(value, Dispatcher) and value.signatures:
                used[value.py_func.__module__ + "." + value.py_func.__qualname__] = value.signatures
assert "spotfit._kernels.levenberg_marquardt" in used, sorted(used)
for name, sigs in used.items():
    if len(sigs) > 1:
        print(name, *sigs, sep="\\n    ")
"""


def test_one_signature_per_kernel_across_2d_and_z_stack_fits():
    """Every fit passes a kernel the same types (numba compiles each signature on its own:
    a second one doubled a first z-stack's compile time): 2D and z-stack, with and without
    a camera, read-only and float32 images, model selection or not. In a process of its
    own (other tests call kernels with other types); kernels loaded from the cache count
    their signatures too."""
    done = subprocess.run([sys.executable, "-c", _ONE_SIGNATURE], capture_output=True, text=True,
                          timeout=600, cwd=PACKAGE.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == "", f"kernels with more than one signature:\n{done.stdout}"


def test_a_kernel_keeps_its_own_fastmath_whoever_compiles_it_first():
    """numba compiles a callee that sets no ``fastmath`` with its first caller's (it
    inherits the flag): the 3D model (``model_window``) then came out with fused
    multiply-adds when the solver's ``_accumulate`` (fastmath; now ``_pixel_costs``) compiled it first and
    without them when the covariance kernel did, and error columns differed in the
    8th digit between two first runs of the same code.  spotfit's njit sets
    ``fastmath=False`` unless a kernel asks for it."""
    @_jit.njit(cache=False)
    def callee(x, y, z):
        return x * y + z

    @_jit.njit(cache=False, fastmath={"reassoc", "contract"})
    def fast_caller(x, y, z):
        return callee(x, y, z) + 1.0

    @_jit.njit(cache=False)
    def plain_caller(x, y, z):
        return callee(x, y, z) + 1.0

    fast_caller(1.5, 2.5, 3.5)  # compiles callee first, inside a fastmath caller
    plain_caller(1.5, 2.5, 3.5)
    ir = callee.inspect_llvm(callee.signatures[0])
    ops = re.findall(r"= (fmul|fadd)([a-z ]*) double", ir)
    assert ops, ir  # the callee's multiply and add ...
    assert all(flags.strip() == "" for _, flags in ops), ops  # ... without fast-math flags


_LOADED_THEN_COMPILED = """
import sys
import numpy as np
import spotfit
from spotfit import _jit

image, _ = spotfit.simulate((40, 52), n_spots=4, photons=2000, background=10, sigma=1.3,
                            min_separation=10, border=5, seed=8)
first = spotfit.fit(image)  # kernels from the cache (warmed by the parent)
print("refreshed" if "numba.np.arraymath" in sys.modules else "light")

def halve(x):
    return x / 2

halve.__module__ = "spotfit.test_only"
assert _jit.njit(cache=False)(halve)(3.0) == 1.5  # a compilation: numba's full context
again = spotfit.fit(image)
assert "numba.np.arraymath" in sys.modules
for name in first.columns:
    np.testing.assert_array_equal(first[name].to_numpy(), again[name].to_numpy(), err_msg=name)
print("ok")
"""


def test_kernels_loaded_without_a_context_refresh_then_a_compilation():
    """Cached kernels load without numba's context refresh (the imports of every
    implementation numba has; compiling needs them, running cached code does not);
    a compilation later in the same process refreshes the context as usual, and the
    loaded kernels give the same numbers before and after."""
    for expected in (None, "light"):  # the first run may compile (cold cache)
        done = subprocess.run([sys.executable, "-c", _LOADED_THEN_COMPILED], capture_output=True,
                              text=True, timeout=600, cwd=PACKAGE.parent)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.split()[-1] == "ok"
    assert done.stdout.split()[0] == (expected if _jit.light_load_verified() else "refreshed")


_WARM_PATHS = """
import sys
import numpy as np
import spotfit

rng = np.random.default_rng(31)
# a frame with isolated spots and overlapping pairs (joint fits in tiles), fitted with and
# without a camera; a dense frame (the joint fits of a whole frame); a z-stack; measure
image, truth = spotfit.simulate((60, 84), n_spots=14, photons=3000, background=15, sigma=1.2,
                                min_separation=3, border=6, seed=rng)
tables = [spotfit.fit(image), spotfit.fit(image, camera=dict(gain=1.0, baseline=0.0))]
dense, _ = spotfit.simulate((32, 40), n_spots=40, photons=3000, background=20, sigma=1.1,
                            min_separation=1.5, border=2, seed=rng)
tables.append(spotfit.fit(dense, camera=dict(gain=1.0, baseline=0.0), sigma=1.1))
stack, _ = spotfit.simulate((9, 40, 52), n_spots=5, photons=4000, background=10, sigma=1.2,
                            sigma_z=1.5, z_stack=True,
                            min_separation=10, border=5, seed=rng)
tables.append(spotfit.fit(stack, axes="ZYX", sigma=1.2, sigma_z=1.5))
tables.append(spotfit.measure(image, truth[["x", "y"]], sigma=1.2))
print("refreshed" if "numba.np.arraymath" in sys.modules else "light")
print(" ".join(f"{len(t)}:{t['x'].sum()!r}:{t['intensity'].sum()!r}" for t in tables))
"""


def test_every_main_path_runs_from_the_cache_loaded_lightly():
    """A warm process loads the kernels of single-spot, joint (tiles and whole frames),
    3D and measure fits lightly (without numba's context refresh), and they give the
    numbers of the process that compiled or loaded them the usual way: machine code that
    called a symbol the light load does not register would crash the process."""
    runs = []
    for _ in range(2):  # the first may compile (cold cache); the second is warm
        done = subprocess.run([sys.executable, "-c", _WARM_PATHS], capture_output=True,
                              text=True, timeout=900, cwd=PACKAGE.parent)
        assert done.returncode == 0, done.stderr[-3000:]
        runs.append(done.stdout.split())
    assert runs[1][0] == ("light" if _jit.light_load_verified() else "refreshed")
    assert runs[1][1:] == runs[0][1:], runs  # row counts and sums of x and intensity, bit for bit
    assert all(int(table.split(":")[0]) > 0 for table in runs[1][1:]), runs


def test_threads_needing_the_kernel_wait_for_the_second_process_too(monkeypatch):
    """Fits in pieces on several threads reach the covariance kernel at about the same
    time: every one of them returns from join_alongside only once the second compiling
    process is done (else one would compile the kernel itself meanwhile)."""
    import threading
    import time

    class Slow(_Running):
        def wait(self, timeout=None):
            time.sleep(0.3)
            return super().wait(timeout)

    helper = Slow()
    monkeypatch.setitem(_jit._state, "helper", helper)
    monkeypatch.setitem(_jit._state, "meanwhile", None)
    seen = []

    def join():
        _jit.join_alongside()
        seen.append(helper.waited)

    threads = [threading.Thread(target=join) for _ in range(3)]
    for t in threads:
        t.start()
        time.sleep(0.05)  # the later ones arrive while the first waits
    for t in threads:
        t.join()
    assert seen == [True, True, True]
    assert _jit._state["helper"] is None


def test_first_class_function_is_typed_once_as_numba_types_it():
    """A kernel's first-class function argument (:func:`spotfit._jit.first_class`) has its
    numba type kept: the type numba's own typing gives, the same object every call."""
    import numba
    from numba.experimental.function_type import typeof_function_type

    from spotfit._kernels import MODEL

    expected = typeof_function_type(MODEL, None)
    assert numba.typeof(MODEL) == expected
    assert numba.typeof(MODEL) is numba.typeof(MODEL)
    assert numba.typeof(MODEL).signature == MODEL.signature()
