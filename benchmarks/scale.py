"""Blockwise fitting of a volume larger than one process should hold, on a Dask LocalCluster.

Writes a uint16 OME-Zarr z-stack (default 128 x 4096 x 4096 voxels = 4.3 GB,
1.2e5 spots, sigma 1.3 px laterally and 2 planes axially, 10 photons/px
background (Poisson; drawn for three slabs and cycled, to write fast), camera
baseline 100 ADU and gain 1) slab by slab into a
temporary folder (never whole in memory), then fits it through
``spotfit.blockwise.fit_blocks`` on a ``distributed.LocalCluster`` of 1 and
of 2 single-threaded worker processes (started here, on localhost), and
reports per run: wall time, throughput (voxels/s), spots found, recall
against the truth (1.5 px) and the peak resident memory of each worker
process (sampled every 0.2 s with psutil).  Beside it, a slice of the volume
that fits in memory is fitted by ``spotfit.fit`` on the NumPy array (this
process, all cores) and blockwise on the 2-worker cluster: the two tables
must be the same (rows and values).  The folder is deleted afterwards.

    python benchmarks/scale.py            # ~4.3 GB volume (needs ~6 GB free disk), ~15-25 min
    python benchmarks/scale.py --quick    # 64 x 1024 x 1024 (0.13 GB), 256 x 256 cores, ~1 min
    python benchmarks/scale.py --dir /scratch --planes 256   # 8.6 GB as in issue #16

Targets (issue #16): peak memory per worker <= 1.5 GB, 2 workers >= 1.7 x the
throughput of 1 (two cores; on a machine shared with other jobs the ratio
is lower).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time

import numpy as np

import spotfit
from spotfit import blockwise
from spotfit.camera import Camera

CAMERA = Camera(baseline=100.0, gain=1.0)
SIGMA, SIGMA_Z = 1.3, 2.0
BACKGROUND = 10.0
GB = 1e9


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def write_volume(path, shape, n_spots, chunks, seed):
    """An OME-Zarr z-stack with Gaussian spots and Poisson noise, written slab by slab; the truth."""
    import zarr

    rng = np.random.default_rng(seed)
    nz, ny, nx = shape
    truth = np.column_stack([rng.uniform(3, nx - 4, n_spots), rng.uniform(3, ny - 4, n_spots),
                             rng.uniform(1, nz - 2, n_spots)])  # x, y, z
    photons = rng.uniform(1500, 3000, n_spots)
    g = zarr.open_group(path, mode="w")
    create = getattr(g, "create_array", None) or g.create_dataset  # zarr 3 / zarr 2
    arr = create("0", shape=shape, chunks=chunks, dtype=np.uint16)
    g.attrs["multiscales"] = [{
        "version": "0.4", "name": "scale-benchmark",
        "axes": [{"name": n, "type": "space", "unit": "micrometer"} for n in "zyx"],
        "datasets": [{"path": "0", "coordinateTransformations": [
            {"type": "scale", "scale": [0.3, 0.1, 0.1]}]}]}]
    hz, hy = int(np.ceil(3 * SIGMA_Z)), int(np.ceil(3 * SIGMA))
    dz, dy, dx = np.meshgrid(np.arange(-hz, hz + 1), np.arange(-hy, hy + 1), np.arange(-hy, hy + 1),
                             indexing="ij")
    dz, dy, dx = dz.ravel(), dy.ravel(), dx.ravel()
    norm = (2 * np.pi) ** 1.5 * SIGMA**2 * SIGMA_Z
    slab_y, slab_x = chunks[1], min(nx, 4 * chunks[2])
    # background noise: a few Poisson slabs drawn once, cycled (drawing 10^9
    # Poisson numbers would take most of the benchmark); each spot's photons
    # are drawn afresh and added (a sum of Poisson variables is Poisson)
    noise = [rng.poisson(BACKGROUND, size=(nz, slab_y, slab_x)).astype(np.uint16) + np.uint16(CAMERA.baseline)
             for _ in range(3)]
    k = 0
    for y0 in range(0, ny, slab_y):
        for x0 in range(0, nx, slab_x):
            y1, x1 = min(ny, y0 + slab_y), min(nx, x0 + slab_x)
            shape_ = (nz, y1 - y0, x1 - x0)
            near = ((truth[:, 0] > x0 - hy - 1) & (truth[:, 0] < x1 + hy + 1)
                    & (truth[:, 1] > y0 - hy - 1) & (truth[:, 1] < y1 + hy + 1))
            s = truth[near]
            cz, cy, cx = (np.rint(s[:, 2]).astype(int)[:, None] + dz, np.rint(s[:, 1]).astype(int)[:, None] + dy,
                          np.rint(s[:, 0]).astype(int)[:, None] + dx)
            val = photons[near][:, None] / norm * np.exp(
                -0.5 * (((cx - s[:, :1]) / SIGMA) ** 2 + ((cy - s[:, 1:2]) / SIGMA) ** 2
                        + ((cz - s[:, 2:3]) / SIGMA_Z) ** 2))
            ok = (cz >= 0) & (cz < nz) & (cy >= y0) & (cy < y1) & (cx >= x0) & (cx < x1)
            flat = np.ravel_multi_index((cz[ok], cy[ok] - y0, cx[ok] - x0), shape_)
            block = noise[k % len(noise)][:, :y1 - y0, :x1 - x0].copy()
            k += 1
            lam = np.bincount(flat, weights=val[ok], minlength=int(np.prod(shape_)))
            where = np.flatnonzero(lam)
            lam = lam[where]
            block.ravel()[where] = np.minimum(block.ravel()[where] + rng.poisson(lam), 65535)
            arr[:, y0:y1, x0:x1] = block
        log(f"  written rows {y0}-{y1} of {ny}")
    return truth


class PeakRSS:
    """Peak resident memory of the cluster's worker processes, sampled in a thread."""

    def __init__(self, client):
        import psutil

        self.procs = [psutil.Process(pid) for pid in client.run(os.getpid).values()]
        self.peak = {p.pid: 0 for p in self.procs}
        self.cpu = 0.0  # CPU seconds of the workers while sampled
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        while not self._stop.is_set():
            for p in self.procs:
                try:
                    self.peak[p.pid] = max(self.peak[p.pid], p.memory_info().rss)
                except Exception:
                    pass
            self._stop.wait(0.2)

    def _cpu(self):
        total = 0.0
        for p in self.procs:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except Exception:
                pass
        return total

    def __enter__(self):
        self._cpu0 = self._cpu()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.cpu = self._cpu() - self._cpu0
        self._stop.set()
        self._thread.join()


def recall(table, truth, radius=1.5):
    from spotfit.match import match_spots

    found = table[["x", "y", "z"]].to_numpy()
    pairs = match_spots(found, truth, radius)
    n = len(pairs[0]) if isinstance(pairs, tuple) else len(pairs)
    return n / len(truth)


def run_cluster(data, n_workers, block_size):
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None, memory_limit=None) as cluster, Client(cluster) as client:
        client.run(lambda: __import__("spotfit.blockwise"))  # imports (and numba's cache) before timing
        done = [0]

        def progress(k, total):
            if k == total or k - done[0] >= max(1, total // 10):
                done[0] = k
                log(f"    {n_workers} worker(s): {k}/{total} blocks")

        with PeakRSS(client) as rss:
            start = time.perf_counter()
            table = blockwise.fit_blocks(data, axes="ZYX", camera=CAMERA, sigma=SIGMA, sigma_z=SIGMA_Z,
                                         block_size=block_size, scheduler=client, progress=progress,
                                         on_error="raise")
            wall = time.perf_counter() - start
    return table, wall, max(rss.peak.values()) / GB, sorted(v / GB for v in rss.peak.values()), rss.cpu


def same(a, b):
    if len(a) != len(b) or list(a.columns) != list(b.columns):
        return False
    num = a.select_dtypes("number").columns
    return bool(np.allclose(a[num].to_numpy(float), b[num].to_numpy(float), rtol=1e-9, atol=1e-9,
                            equal_nan=True) and (a["status"].to_numpy() == b["status"].to_numpy()).all())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="64 x 1024 x 1024 voxels, 3000 spots")
    ap.add_argument("--planes", type=int, default=128)
    ap.add_argument("--size", type=int, default=4096, help="rows = columns")
    ap.add_argument("--spots", type=int, default=120_000)
    ap.add_argument("--block-size", type=int, default=None, help="lateral core size (default: automatic)")
    ap.add_argument("--dir", default=None, help="where to write the volume (default: a temporary folder)")
    ap.add_argument("--seed", type=int, default=16)
    args = ap.parse_args()
    if args.quick:
        args.planes, args.size, args.spots = 64, 1024, 3000
        args.block_size = args.block_size or 256  # 16 blocks, to share between 2 workers
    shape = (args.planes, args.size, args.size)
    chunks = (args.planes, 256, 256)
    nbytes = int(np.prod(shape)) * 2
    where = tempfile.mkdtemp(prefix="spotfit-scale-", dir=args.dir)
    if shutil.disk_usage(where).free < nbytes * 1.3 + 2 * GB:
        sys.exit(f"not enough free disk in {where} for a {nbytes / GB:.1f} GB volume")
    path = os.path.join(where, "volume.ome.zarr")
    print(f"spotfit {os.path.dirname(spotfit.__file__)}; {os.cpu_count()} cores")
    try:
        log(f"writing {shape} uint16 ({nbytes / GB:.2f} GB), {args.spots} spots, chunks {chunks} ...")
        t = time.perf_counter()
        truth = write_volume(path, shape, args.spots, chunks, args.seed)
        on_disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
        print(f"volume: {shape[0]} x {shape[1]} x {shape[2]} uint16 = {nbytes / GB:.2f} GB "
              f"({on_disk / GB:.2f} GB on disk, OME-Zarr chunks {chunks}), {len(truth)} spots; "
              f"written in {time.perf_counter() - t:.0f} s")
        img = spotfit.read_image(path)
        data = img.data[0]
        block = None if args.block_size is None else (shape[0], args.block_size, args.block_size)
        plan = blockwise.plan_blocks(shape, spotfit.FitConfig(sigma=SIGMA, sigma_z=SIGMA_Z),
                                     block, chunks=chunks)
        core = plan[0].core
        read = max(plan, key=lambda b: np.prod([s.stop - s.start for s in b.read])).read
        print(f"blocks: {len(plan)}, core {'x'.join(str(s.stop - s.start) for s in core)}, largest read "
              f"{'x'.join(str(s.stop - s.start) for s in read)} (halo "
              f"{'x'.join(map(str, blockwise.halo(spotfit.FitConfig(sigma=SIGMA, sigma_z=SIGMA_Z), 3)))})")

        rows = []
        tables = {}
        for n in (1, 2):
            log(f"  fitting on a LocalCluster of {n} worker(s) ...")
            table, wall, peak, peaks, cpu = run_cluster(data, n, block)
            tables[n] = table
            rows.append((f"LocalCluster, {n} worker{'s' if n > 1 else ''}", wall, np.prod(shape) / wall,
                         len(table), recall(table, truth), peak, peaks, cpu))
        print()
        print(f"{'run':<28} {'wall s':>8} {'Mvoxel/s':>9} {'spots':>8} {'recall':>7} {'peak GB/worker':>15} "
              f"{'worker CPU s':>13} {'cores got':>10}")
        for name, wall, tput, n, rec, peak, peaks, cpu in rows:
            print(f"{name:<28} {wall:8.1f} {tput / 1e6:9.2f} {n:8d} {rec:7.3f} {peak:15.2f} {cpu:13.0f} "
                  f"{cpu / wall:10.2f}   (peak per worker: {', '.join(f'{p:.2f}' for p in peaks)} GB)")
        ratio = rows[0][1] / rows[1][1]
        load = os.getloadavg()
        print(f"throughput 2 workers / 1 worker: {ratio:.2f}x (target >= 1.7 on 2 free cores; the workers "
              f"got {rows[1][7] / rows[1][1]:.2f} cores on average, load average now {load[0]:.1f} / "
              f"{load[1]:.1f}); CPU seconds per voxel 2 vs 1 worker: {rows[1][7] / rows[0][7]:.2f}; "
              f"peak per worker {max(r[5] for r in rows):.2f} GB (target <= 1.5); "
              f"tables of 1 and 2 workers the same: {same(tables[1], tables[2])}")

        # a slice that fits in memory: in memory (this process) beside blockwise (2 workers)
        side = min(args.size, 1024 if not args.quick else 512)
        sub = data[:, :side, :side]
        arr = np.asarray(sub)
        log(f"  in memory: {arr.shape} ...")
        spotfit.fit(arr[:, :64, :64], axes="ZYX", camera=CAMERA, sigma=SIGMA, sigma_z=SIGMA_Z)  # compile
        t = time.perf_counter()
        ref = spotfit.fit(arr, axes="ZYX", camera=CAMERA, sigma=SIGMA, sigma_z=SIGMA_Z)
        t_mem = time.perf_counter() - t
        got, t_blk, peak, _, _ = run_cluster(sub, 2, block)
        print()
        print(f"slice {arr.shape[0]} x {arr.shape[1]} x {arr.shape[2]} ({arr.nbytes / GB:.2f} GB):")
        print(f"{'in memory (spotfit.fit, numpy)':<36} {t_mem:8.1f} s {arr.size / t_mem / 1e6:9.2f} Mvoxel/s "
              f"{len(ref):7d} spots")
        print(f"{'blockwise, LocalCluster 2 workers':<36} {t_blk:8.1f} s {arr.size / t_blk / 1e6:9.2f} Mvoxel/s "
              f"{len(got):7d} spots (peak {peak:.2f} GB/worker)")
        print(f"same table (rows, order, values within 1e-9): {same(ref, got)}")
    finally:
        shutil.rmtree(where, ignore_errors=True)


if __name__ == "__main__":
    main()
