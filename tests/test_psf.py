"""Tests of spotfit.psf.estimate_sigma (``--sigma auto``) on simulated images of known PSF width."""

import numpy as np
import pytest

from spotfit.camera import Camera
from spotfit.errors import SpotfitInputError
from spotfit.psf import estimate_sigma
from spotfit.simulation import simulate

CAMERA = Camera(baseline=100.0, gain=1.0, read_noise=1.5)


@pytest.mark.parametrize("sigma", [0.8, 1.3, 2.5])
@pytest.mark.parametrize("calibrated", [True, False], ids=["camera", "no-camera"])
def test_sigma_of_simulated_spots(sigma, calibrated):
    # 2 frames x 30 well separated spots of 2000-6000 photons
    img, _ = simulate((2, 170, 230), n_spots=30, photons=(2000, 6000), background=20, sigma=sigma,
                      camera=CAMERA, min_separation=10 * sigma, seed=11)
    est = estimate_sigma(img, camera=CAMERA if calibrated else None)
    assert est.n_spots >= 20
    # the median of >= 20 widths, each measured to ~1 %: within 2 % of the truth
    assert est.sigma == pytest.approx(sigma, rel=0.02)
    assert est.sigma_z is None
    assert "sigma auto" in est.describe()


def test_a_poor_first_guess_converges():
    img, _ = simulate((150, 190), n_spots=25, photons=(3000, 6000), background=10, sigma=2.2,
                      camera=CAMERA, min_separation=20, seed=4)
    for start in (0.8, 4.0):
        assert estimate_sigma(img, camera=CAMERA, start=start).sigma == pytest.approx(2.2, rel=0.02)


def test_z_stack_lateral_and_axial_sigma():
    img, _ = simulate((24, 100, 130), n_spots=30, photons=(4000, 8000), background=10, sigma=1.4,
                      sigma_z=2.5, z_stack=True, camera=CAMERA, min_separation=12, seed=2)
    est = estimate_sigma(img, camera=CAMERA, axes="ZYX")
    assert est.sigma == pytest.approx(1.4, rel=0.03)
    assert est.sigma_z == pytest.approx(2.5, rel=0.05)


def test_no_spots_is_a_clear_error():
    img, _ = simulate((80, 110), n_spots=0, background=20, camera=CAMERA, seed=1)
    with pytest.raises(SpotfitInputError, match="sigma"):
        estimate_sigma(img, camera=CAMERA)
