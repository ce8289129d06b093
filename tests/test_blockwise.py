"""Blockwise fitting (spotfit.blockwise, the dask extra): the same table as in memory.

Spots are placed on the block borders and corners (where a block cut would
lose or duplicate them); the blockwise tables are compared with the
in-memory table row by row: same rows in the same order, equal values
(tolerance 1e-9 px / relative 1e-9: floating-point noise).
"""

import os
import signal

import numpy as np
import pandas as pd
import pytest

import spotfit
import spotfit.fields
import spotfit.group
import spotfit.api  # noqa: F401  (spotfit.api._fit_frames below)
from spotfit import blockwise

da = pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")
zarr = pytest.importorskip("zarr")

# distributed's servers leave sockets to the garbage collector, and warn about them
pytestmark = [pytest.mark.filterwarnings("ignore::ResourceWarning"),
              pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning:distributed"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]

SIGMA_Z = 2.0
LOCAL = dict(threads_per_worker=1, dashboard_address=None)  # in-process workers (inproc://)
CAMERA = spotfit.Camera(baseline=100.0, gain=1.0)
FRAME_FIT = spotfit.api._fit_frames  # what spotfit.fit hands fit_blocks: the in-memory path


def _assert_same(got, ref):
    assert len(ref) > 0
    assert list(got.columns) == list(ref.columns)
    assert len(got) == len(ref)
    assert (got["status"].to_numpy() == ref["status"].to_numpy()).all()
    num = ref.select_dtypes("number").columns
    np.testing.assert_allclose(got[num].to_numpy(float), ref[num].to_numpy(float), rtol=1e-9,
                               atol=1e-9, equal_nan=True)


def _edge_positions(shape, core, rng, n_random):
    """Spots on the borders and corners of the cores (x, y[, z]) plus random ones."""
    nd = len(shape)
    cuts = [np.arange(c, n, c) for c, n in zip(core, shape)]
    pos = []
    for y in cuts[-2]:
        for x in cuts[-1]:
            for dy, dx in ((-0.5, -0.5), (0.4, 0.3), (-0.2, 6.0), (7.0, 0.1)):
                p = [x + dx, y + dy]
                if nd == 3:
                    p.append(rng.uniform(2, shape[0] - 3))
                pos.append(p)
    lo = np.array([3.0] * nd)
    hi = np.array(shape[::-1], float) - 4
    pos += list(rng.uniform(lo, hi, size=(n_random, nd)))
    return np.array(pos)


@pytest.fixture(scope="module")
def volume():
    rng = np.random.default_rng(16)
    shape = (14, 84, 100)  # z, y, x
    pos = _edge_positions(shape, (14, 30, 36), rng, 25)
    img, _ = spotfit.simulate(shape, positions=pos, photons=2500, background=10, sigma=1.3,
                              sigma_z=SIGMA_Z, z_stack=True, seed=rng)
    return img


@pytest.fixture(scope="module")
def volume_ref(volume):
    return {cam: spotfit.fit(volume, axes="ZYX", camera=c, sigma_z=SIGMA_Z)
            for cam, c in (("calibrated", CAMERA), ("adu", spotfit.Camera(baseline=100.0)))}


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(n_workers=2, processes=False, **LOCAL) as cluster, distributed.Client(cluster) as c:
        yield c


@pytest.mark.parametrize("block_size", [(14, 30, 36), (7, 42, 50)])
@pytest.mark.parametrize("cam", ["calibrated", "adu"])
def test_volume_blockwise_equals_in_memory(volume, volume_ref, block_size, cam):
    camera = CAMERA if cam == "calibrated" else spotfit.Camera(baseline=100.0)
    data = da.from_array(volume, chunks=(7, 32, 32))
    got = blockwise.fit_blocks(data, axes="ZYX", camera=camera, block_size=block_size,
                               sigma_z=SIGMA_Z, on_error="raise")
    _assert_same(got, volume_ref[cam])
    assert len(blockwise.plan_blocks(volume.shape, spotfit.FitConfig(sigma_z=SIGMA_Z), block_size)) > 4


@pytest.mark.parametrize("workers", [1, 2])
def test_volume_on_a_local_cluster(volume, volume_ref, client, workers):
    if workers == 1:
        with distributed.LocalCluster(n_workers=1, processes=False, **LOCAL) as cluster, distributed.Client(cluster) as one:
            got = blockwise.fit_blocks(da.from_array(volume, chunks=(14, 42, 50)), axes="ZYX",
                                       camera=CAMERA, block_size=(14, 30, 36), sigma_z=SIGMA_Z,
                                       scheduler=one, on_error="raise")
    else:
        seen = []
        got = blockwise.fit_blocks(da.from_array(volume, chunks=(14, 42, 50)), axes="ZYX", camera=CAMERA,
                                   block_size=(14, 30, 36), sigma_z=SIGMA_Z, scheduler=client,
                                   progress=lambda done, total: seen.append((done, total)),
                                   on_error="raise")
        assert seen[-1][0] == seen[-1][1] == len(seen) > 4  # progress fed by the scheduler
    _assert_same(got, volume_ref["calibrated"])


def test_time_series_blockwise_equals_in_memory(client):
    rng = np.random.default_rng(7)
    shape = (90, 110)
    frames = []
    for t in range(3):
        pos = _edge_positions(shape, (32, 40), rng, 20)
        img, _ = spotfit.simulate(shape, positions=pos, photons=1500, background=12, sigma=1.3,
                                  seed=rng)
        frames.append(img)
    movie = np.stack(frames)
    lazy = da.from_array(movie, chunks=(1, 45, 55))
    # spatial blocks here and on the cluster; whole frames (several per task)
    # through spotfit.fit, which takes the lazy array itself
    runs = {CAMERA: (((32, 40), None), ((32, 40), client), (None, None)),
            spotfit.Camera(baseline=100.0): (((32, 40), client), (None, None))}
    for camera, settings in runs.items():
        ref = spotfit.fit(movie, camera=camera)
        for block_size, scheduler in settings:
            if block_size is None:
                got = spotfit.fit(lazy, camera=camera)
            else:
                got = blockwise.fit_blocks(lazy, camera=camera, block_size=block_size,
                                           scheduler=scheduler, on_error="raise", frame_fit=FRAME_FIT)
            _assert_same(got, ref)
    det_ref = spotfit.detect(movie, camera=CAMERA)
    det = blockwise.detect_blocks(da.from_array(movie, chunks=(1, 30, 30)), camera=CAMERA,
                                  block_size=30)
    pd.testing.assert_frame_equal(det, det_ref)


def _ome_zarr(path, data, scale=(0.3, 0.1, 0.1), chunks=(14, 32, 32)):
    g = zarr.open_group(str(path), mode="w")
    create = getattr(g, "create_array", None) or g.create_dataset  # zarr 3 / zarr 2
    a = create("0", shape=data.shape, chunks=chunks, dtype=data.dtype)
    a[:] = data
    g.attrs["multiscales"] = [{
        "version": "0.4",
        "axes": [{"name": n, "type": "space", "unit": "micrometer"} for n in "zyx"],
        "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale",
                                                                  "scale": list(scale)}]}]}]
    return str(path)


def test_ome_zarr_is_read_lazily(tmp_path, volume, volume_ref, monkeypatch):
    path = _ome_zarr(tmp_path / "vol.ome.zarr", volume)
    reads = []
    original = zarr.Array.__getitem__

    def counting(self, selection):
        out = original(self, selection)
        if np.size(out):  # (dask asks for an empty selection to learn the type)
            reads.append(np.size(out))
        return out

    monkeypatch.setattr(zarr.Array, "__getitem__", counting)
    img = spotfit.read_image(path)
    assert reads == []  # opening reads no pixels
    assert (img.axes, img.pixel_size, img.z_step) == ("TZYX", 0.1, 0.3)
    assert img.data.shape == (1,) + volume.shape
    got = spotfit.fit(img, camera=CAMERA, sigma_z=SIGMA_Z)
    assert reads and max(reads) <= 14 * 32 * 32  # chunk by chunk, never the whole volume
    ref = spotfit.table.add_physical_units(volume_ref["calibrated"].copy(), 0.1, 0.3)
    _assert_same(got, ref)


def test_cli_fits_an_ome_zarr_folder(tmp_path, volume, volume_ref):
    from click.testing import CliRunner

    from spotfit.cli import main

    path = _ome_zarr(tmp_path / "vol.zarr", volume)
    out = tmp_path / "spots.csv"
    res = CliRunner().invoke(main, ["fit", path, "--baseline", "100", "--gain", "1", "--sigma-z", "2",
                                    "--block-size", "14x30x36", "--out", str(out)])
    assert res.exit_code == 0, res.output
    got = pd.read_csv(out)
    ref = volume_ref["calibrated"]
    assert len(got) == len(ref)
    np.testing.assert_allclose(got[["x", "y", "z"]].to_numpy(), ref[["x", "y", "z"]].to_numpy(),
                               atol=1e-5)  # CSV keeps 8 significant digits
    res = CliRunner().invoke(main, ["fit", path, "--block-size", "0x4"])
    assert res.exit_code == 2 and "block size" in res.output


def test_a_failing_block_is_reported_and_the_others_kept(volume, volume_ref, monkeypatch):
    failing = (0, 1, 1)
    original = blockwise._fit_one

    def fit_one(setup, t, raw, photons, block, *args, **kwargs):
        if block.index == failing:
            raise RuntimeError("disk hiccup")
        return original(setup, t, raw, photons, block, *args, **kwargs)

    monkeypatch.setattr(blockwise, "_fit_one", fit_one)
    data = da.from_array(volume, chunks=(14, 42, 50))
    with pytest.warns(spotfit.SpotfitWarning, match=r"block 0,1,1 \(z 0:14, y 30:60, x 36:72\).*disk hiccup"):
        got = blockwise.fit_blocks(data, axes="ZYX", camera=CAMERA, block_size=(14, 30, 36),
                                   sigma_z=SIGMA_Z)
    ref = volume_ref["calibrated"]
    x, y = np.rint(ref["x"]).to_numpy(), np.rint(ref["y"]).to_numpy()
    lost = (y >= 30) & (y < 60) & (x >= 36) & (x < 72)  # fitted position ~ detected pixel
    assert 0 < len(ref) - len(got) and abs(len(ref) - len(got) - lost.sum()) <= 1
    with pytest.raises(blockwise.BlockError, match="disk hiccup"):
        blockwise.fit_blocks(data, axes="ZYX", camera=CAMERA, block_size=(14, 30, 36),
                             sigma_z=SIGMA_Z, on_error="raise")


_KILL_MARK = {}


def _killing_chunk(block, mark, block_info=None):
    """Pixels of a chunk; the first read of chunk (0, 1, 1) kills its worker process."""
    loc = tuple(block_info[0]["chunk-location"]) if block_info else None
    if loc == (0, 1, 1) and not os.path.exists(mark):
        open(mark, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    return block


def test_a_killed_worker_is_recomputed(tmp_path, volume, volume_ref):
    import cloudpickle

    cloudpickle.register_pickle_by_value(__import__(__name__))
    mark = str(tmp_path / "killed")
    data = da.from_array(volume, chunks=(14, 30, 36)).map_blocks(_killing_chunk, mark, dtype=volume.dtype)
    with distributed.LocalCluster(n_workers=2, processes=True, host="127.0.0.1", **LOCAL) as cluster, distributed.Client(cluster) as c:
        got = blockwise.fit_blocks(data, axes="ZYX", camera=CAMERA, block_size=(14, 30, 36),
                                   sigma_z=SIGMA_Z, scheduler=c, on_error="raise")
    assert os.path.exists(mark)  # a worker was killed mid-run
    _assert_same(got, volume_ref["calibrated"])


def test_whole_experiment_on_a_cluster(tmp_path, client):
    import tifffile

    from spotfit.batch import run_batch

    rng = np.random.default_rng(3)
    for name in ("a", "b"):
        img, _ = spotfit.simulate((2, 60, 70), n_spots=8, photons=2000, background=10, seed=rng)
        tifffile.imwrite(tmp_path / f"{name}.tif", img)
    (tmp_path / "bad.tif").write_bytes(b"not a tiff at all")
    inputs = [str(tmp_path / n) for n in ("a.tif", "bad.tif", "b.tif")]
    local = run_batch(inputs, tmp_path / "local", camera=CAMERA, workers=1, progress=False)
    remote = run_batch(inputs, tmp_path / "cluster", camera=CAMERA, scheduler=client, progress=False)
    assert [r.status for r in remote.results] == ["ok", "failed", "ok"]  # one bad file, the rest run
    assert "bad.tif" in remote.results[1].input and remote.results[1].message
    for name in ("a", "b"):
        assert (tmp_path / "cluster" / f"{name}.csv").read_bytes() == \
            (tmp_path / "local" / f"{name}.csv").read_bytes()
        assert (tmp_path / "cluster" / f"{name}.json").exists()
    assert not (tmp_path / "cluster" / "bad.csv").exists()
    assert [r.n_spots for r in remote.results] == [r.n_spots for r in local.results]


def test_zarr_errors_name_the_folder(tmp_path):
    from click.testing import CliRunner

    from spotfit.cli import main

    group = tmp_path / "plain.zarr"
    zarr.open_group(str(group), mode="w")  # a group without OME metadata
    with pytest.raises(spotfit.SpotfitInputError, match="plain.zarr.*multiscales"):
        spotfit.read_image(str(group))
    res = CliRunner().invoke(main, ["fit", str(group)])
    assert res.exit_code == 1 and "multiscales" in res.output and "Traceback" not in res.output
    # a plain Zarr array: its last two axes are rows and columns
    arr = zarr.open_array(str(tmp_path / "plain_array.zarr"), mode="w", shape=(40, 50), chunks=(20, 25),
                          dtype="uint16")
    arr[:] = 100
    img = spotfit.read_image(str(tmp_path / "plain_array.zarr"))
    assert img.axes == "TYX" and img.data.shape == (1, 40, 50)


def test_uncalibrated_frames_fitted_in_several_solves(monkeypatch):
    """A frame with more windows than one solve takes: its fit-noise model measured up front
    (in memory, in a whole-frame block, and over the blocks of the frame) is the same."""
    from spotfit import single

    monkeypatch.setattr(single, "PIXEL_BUDGET", 121 * 7)  # 7 windows per solve
    rng = np.random.default_rng(11)
    img, _ = spotfit.simulate((2, 80, 96), n_spots=30, photons=2000, background=10, seed=rng)
    camera = spotfit.Camera(baseline=100.0)
    ref = spotfit.fit(img, camera=camera)
    lazy = da.from_array(img, chunks=(1, 40, 48))
    for block_size in (None, (27, 33)):
        _assert_same(blockwise.fit_blocks(lazy, camera=camera, block_size=block_size,
                                          on_error="raise", frame_fit=FRAME_FIT), ref)


def _dense_movie():
    """Three 70 x 96 px frames: dense (1 spot per 30 px^2), sparse, dense."""
    rng = np.random.default_rng(21)
    frames = []
    for n in (220, 12, 220):
        img, _ = spotfit.simulate((70, 96), n_spots=n, photons=2000, background=20, sigma=1.3,
                                  camera=CAMERA, seed=rng)
        frames.append(img)
    return np.stack(frames)


def test_dense_frames_within_a_block_get_the_in_memory_joint_fits(client, monkeypatch):
    movie = _dense_movie()
    ref = spotfit.fit(movie, camera=CAMERA, sigma=1.3)
    with monkeypatch.context() as m:  # spot by spot, the dense frames give another table
        m.setattr(spotfit.group, "DENSE_COVERAGE", np.inf)
        single = spotfit.fit(movie, camera=CAMERA, sigma=1.3)
    assert len(single) != len(ref) or not np.allclose(single["x"], ref["x"])
    for scheduler in (None, client):
        got = spotfit.blockwise.fit_blocks(da.from_array(movie, chunks=(1, 35, 48)), camera=CAMERA,
                                           sigma=1.3, scheduler=scheduler, on_error="raise",
                                           frame_fit=spotfit.api._fit_frames)
        _assert_same(got, ref)
    _assert_same(spotfit.fit(da.from_array(movie, chunks=(1, 35, 48)), camera=CAMERA, sigma=1.3), ref)


def test_a_dense_frame_cut_into_blocks_is_refused():
    movie = _dense_movie()
    lazy = da.from_array(movie, chunks=(1, 35, 48))
    with pytest.raises(spotfit.SpotfitInputError, match=r"frame 0 is a dense field .*`block_size`"):
        spotfit.blockwise.fit_blocks(lazy, camera=CAMERA, sigma=1.3, block_size=(35, 48),
                                     frame_fit=spotfit.api._fit_frames)
    # sparse frames cut into blocks are fine
    got = spotfit.blockwise.fit_blocks(lazy[1:2], camera=CAMERA, sigma=1.3, block_size=(35, 48))
    _assert_same(got, spotfit.fit(movie[1:2], camera=CAMERA, sigma=1.3))


def test_overlapping_spots_of_a_frame_cut_into_blocks_are_fitted_jointly(monkeypatch):
    """A large sparse frame cut into blocks: its overlapping spots get the joint fits of
    the tiles around them (read from the lazy array), as in memory."""
    rng = np.random.default_rng(5)
    shape = (300, 420)
    lone = rng.uniform([10, 10], [shape[1] - 10, shape[0] - 10], size=(60, 2))
    first = rng.uniform([20, 20], [shape[1] - 20, shape[0] - 20], size=(12, 2))
    angle = rng.uniform(0, np.pi, 12)
    second = first + 2.5 * np.column_stack([np.cos(angle), np.sin(angle)])  # pairs 2.5 px apart
    pos = np.concatenate([lone, first, second])
    calls = []
    tiles = spotfit.fields._fit_tiles
    monkeypatch.setattr(spotfit.fields, "_fit_tiles", lambda *a: calls.append(1) or tiles(*a))
    for camera in (CAMERA, spotfit.Camera(baseline=100.0)):
        img, _ = spotfit.simulate(shape, positions=pos, photons=3000, background=15, sigma=1.3,
                                  camera=CAMERA, seed=rng)
        ref = spotfit.fit(img, camera=camera, sigma=1.3)
        calls.clear()
        lazy = da.from_array(img, chunks=(150, 210))
        got = blockwise.fit_blocks(lazy, camera=camera, sigma=1.3, block_size=(150, 210),
                                   on_error="raise", frame_fit=FRAME_FIT)
        assert len(calls) == 1  # the tiles, blockwise (in memory they ran too)
        _assert_same(got, ref)
