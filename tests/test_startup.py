"""A fresh ``spotfit fit`` imports only what its run needs (the start-up regression).

Users run ``spotfit fit`` in shell loops over thousands of files, so every
process' start-up counts; most of a small image's time was importing
modules that its run never used.  These tests time nothing: they run the
command in a fresh process on a small simulated image with a few spots
(some close together, so that every neighbour search of detection and
fitting runs) and look at ``sys.modules`` afterwards, and at whether a
second, warm run compiles anything or starts the second compiling process.
The speed itself is measured by ``benchmarks/speed.py`` (section C).
"""

import json
import subprocess
import sys

import numpy as np
import pytest

#: imported by a single-spot fit of a small image before #15, never used by it:
#: detection, single-spot fits and the background need none of them
NOT_ON_THE_SMALL_PATH = ("scipy.spatial", "scipy.ndimage", "scipy.sparse.csgraph", "scipy.stats",
                         "scipy.special", "scipy.fft", "scipy.optimize", "scipy.interpolate",
                         "scipy.signal", "skimage", "matplotlib", "dask", "zarr")
#: imported by it until the table was built and written without pandas (spotfit.lighttable;
#: pandas alone was a quarter of a small fit's warm run), and the blockwise engine's module
NOT_ON_THE_SMALL_PATH += ("pandas", "spotfit.blockwise")
#: imported until cached kernels were loaded without numba's context refresh (which
#: imports every implementation numba has, scipy.linalg among them: most of numba's
#: start-up), and until the edge-noise sums were computed without scipy.sparse
NOT_ON_THE_SMALL_PATH += ("numba.np.arraymath", "numba.np.linalg", "scipy.linalg", "scipy.sparse")
#: the cached kernels a small fit loads (each costs a fresh process 10-40 ms): background
#: (3), detection (1), the solver, the covariance, the score gate's quadrupole score and the
#: model code they call through its address (``spotfit._kernels.MODEL``)
KERNELS_OF_A_SMALL_FIT = 8

RUN = r"""
import json, sys
from spotfit import _jit
from spotfit.cli import main
code = main(args=sys.argv[1:], prog_name="spotfit", standalone_mode=False)
from numba.core.dispatcher import Dispatcher
kernels = sorted({f"{v.py_func.__module__}.{v.py_func.__name__}" for name, module in list(sys.modules.items())
                  if name.startswith("spotfit") and module is not None
                  for v in vars(module).values() if isinstance(v, Dispatcher) and v.overloads})
print(json.dumps({"code": code, "modules": sorted(sys.modules), "kernels": kernels,
                  "helper": _jit._state["helper"] is not None or bool(_jit._DETACHED),
                  "numba_threads": sys.modules["numba.np.ufunc.parallel"]._is_initialized}))
"""


@pytest.fixture(scope="module")
def small_image(tmp_path_factory):
    from spotfit.io import write_tiff
    from spotfit.simulation import simulate

    folder = tmp_path_factory.mktemp("startup")
    rng = np.random.default_rng(15)
    # isolated spots, and a pair 5.5 px apart: in each other's window (neighbour masking),
    # farther apart than group_radius * sigma (3.9 px; closer ones get joint fits:
    # test_a_fit_with_joint_fits_imports_no_scipy_spatial_graphs_or_ndimage)
    xy = np.array([[12.3, 10.7], [40.2, 30.4], [60.6, 14.1], [25.5, 36.2], [31.0, 36.4]])
    image, _ = simulate((48, 72), positions=xy, photons=2000, background=20, sigma=1.3, seed=rng)
    path = folder / "small.tif"
    write_tiff(str(path), image, "YX")
    return folder, path


def _light_load() -> bool:
    """Whether cached kernels load without numba's context refresh with this numba
    (the versions checked for it; others import what the refresh imports)."""
    from spotfit import _jit

    return _jit.light_load_verified()


def _fit(folder, path, *extra, command="fit"):
    out = subprocess.run([sys.executable, "-c", RUN, command, str(path), "--out",
                          str(folder / "spots.csv"), *extra],
                         capture_output=True, text=True, cwd=folder, timeout=600)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["code"] in (None, 0), out.stderr
    return result, out.stderr


@pytest.mark.parametrize("camera", [(), ("--gain", "1", "--baseline", "100")], ids=["adu", "photons"])
def test_a_small_fit_imports_only_what_it_uses(small_image, camera):
    folder, path = small_image
    result, stderr = _fit(folder, path, *camera)
    if "Compiling" in stderr:  # the kernels' first run (cold cache): run again, warm
        result, stderr = _fit(folder, path, *camera)
    modules = set(result["modules"])
    expected_unused = NOT_ON_THE_SMALL_PATH if _light_load() else NOT_ON_THE_SMALL_PATH[:-4]
    unused = sorted(m for m in expected_unused
                    if m in modules or any(k.startswith(m + ".") for k in modules))
    assert not unused, f"a small fit imported {unused}"
    assert "numba" in modules and "spotfit.lighttable" in modules  # the run did fit
    assert (folder / "spots.csv").stat().st_size > 0  # and wrote a table
    assert "5 spots" in stderr, stderr
    # a warm run compiles nothing and starts no second compiling process
    assert "Compiling" not in stderr, stderr
    assert not result["helper"]
    assert not result["numba_threads"]  # numba's thread pool (unused by the fit kernels) not launched
    assert 0 < len(result["kernels"]) <= KERNELS_OF_A_SMALL_FIT, result["kernels"]


#: what joint fits used to import (neighbours, groups, filters: ~0.3-0.7 s of a fresh
#: process; spotfit.near and spotfit.background do it now)
NOT_FOR_JOINT_FITS = ("scipy.spatial", "scipy.sparse.csgraph", "scipy.ndimage")


def test_a_fit_with_joint_fits_imports_no_scipy_spatial_graphs_or_ndimage(tmp_path):
    """A frame with overlapping spots (joint fits, residual search): the same imports
    left out as for isolated spots' fits, apart from what joint fits need."""
    from spotfit.io import write_tiff
    from spotfit.simulation import simulate

    rng = np.random.default_rng(16)
    xy = np.array([[12.3, 10.7], [40.2, 30.4], [42.4, 31.6], [25.5, 36.2], [27.1, 34.0], [60.6, 14.1]])
    image, _ = simulate((48, 72), positions=xy, photons=2000, background=20, sigma=1.3, seed=rng)
    path = tmp_path / "pairs.tif"
    write_tiff(str(path), image, "YX")
    result, stderr = _fit(tmp_path, path, "--gain", "1", "--baseline", "100")
    if "Compiling" in stderr:
        result, stderr = _fit(tmp_path, path, "--gain", "1", "--baseline", "100")
    modules = set(result["modules"])
    assert "spotfit.near" in modules  # the joint fits ran
    rows = (tmp_path / "spots.csv").read_text().splitlines()
    assert len(rows) - 1 >= 5, stderr
    imported = sorted(m for m in NOT_FOR_JOINT_FITS if m in modules)
    assert not imported, f"a fit with joint fits imported {imported}"


def test_a_small_detection_imports_no_pandas(small_image):
    folder, path = small_image
    result, stderr = _fit(folder, path, command="detect")
    modules = set(result["modules"])
    assert "pandas" not in modules and "spotfit.blockwise" not in modules
    assert "5 candidates" in stderr, stderr
    assert (folder / "spots.csv").read_text().splitlines()[0] == "frame,x,y,score"


EXIT = r"""
import atexit, gc, sys
from spotfit.cli import main
# registered first, so run last: after spotfit's exit handler
atexit.register(lambda: print(f"frozen {gc.get_freeze_count()}", file=sys.stderr))
main(args=sys.argv[1:], prog_name="spotfit")
"""


def test_the_command_skips_the_last_garbage_collections_and_its_output_is_whole(small_image):
    """At exit the command freezes what is left instead of having the interpreter collect
    it (0.1-0.4 s after a fit); the table on standard output is still complete."""
    folder, path = small_image
    out = subprocess.run([sys.executable, "-c", EXIT, "fit", str(path)], capture_output=True,
                         text=True, cwd=folder, timeout=600)
    assert out.returncode == 0, out.stderr
    rows = out.stdout.splitlines()
    assert rows[0].startswith("frame,x,y,") and len(rows) == 1 + 5 and out.stdout.endswith("\n")
    assert all(len(row.split(",")) == len(rows[0].split(",")) for row in rows)
    frozen = int(out.stderr.strip().splitlines()[-1].split()[-1])
    assert frozen > 10_000, out.stderr


MISSING = r"""
import atexit, sys
atexit.register(lambda: print("numba imported" if "numba" in sys.modules else "numba not imported"))
from spotfit.cli import main
main(args=sys.argv[1:], prog_name="spotfit")
"""


@pytest.mark.parametrize("command", ["fit", "detect"])
def test_a_mistyped_path_fails_before_the_library_is_imported(tmp_path, command):
    """``spotfit fit typo.tif`` says so at once: not after importing numba (~0.6 s)."""
    out = subprocess.run([sys.executable, "-c", MISSING, command, "typo.tif", "--out", "x.csv"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 1
    assert out.stderr.strip() == "Error: typo.tif: no such file"
    assert out.stdout.strip() == "numba not imported"
    assert not (tmp_path / "x.csv").exists()
