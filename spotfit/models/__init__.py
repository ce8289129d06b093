"""PSF models: expected pixel values and analytic Jacobians.

Models know nothing about estimators or solvers; every model works with
every estimator.  Use :func:`get_model` to build one by name.
"""

from __future__ import annotations

from spotfit.errors import SpotfitInputError
from spotfit.models.base import Grid, Model
from spotfit.models.gaussian import (
    Elliptical2D,
    Elliptical3D,
    Rotated2D,
    Symmetric2D,
    Symmetric3D,
)

#: model classes by (name, spatial dimensions)
REGISTRY = {
    ("symmetric", 2): Symmetric2D,
    ("elliptical", 2): Elliptical2D,
    ("rotated", 2): Rotated2D,
    ("symmetric", 3): Symmetric3D,
    ("elliptical", 3): Elliptical3D,
}

MODEL_NAMES = ("rotated", "elliptical", "symmetric")


def get_model(name: str, ndim: int = 2, integrated: bool = False) -> Model:
    """Build a model by name.

    Parameters
    ----------
    name : {"rotated", "elliptical", "symmetric"}
    ndim : {2, 3}
        Spatial dimensions of the data.
    integrated : bool
        Pixel-integrated (True) or point-sampled (False).
    """
    cls = REGISTRY.get((name, ndim))
    if cls is None:
        valid = sorted(n for (n, d) in REGISTRY if d == ndim)
        raise SpotfitInputError(
            f"--model {name!r} is not available for {ndim}D data; choose one of {', '.join(valid)}"
        )
    return cls(integrated=integrated)


__all__ = ["Grid", "Model", "get_model", "REGISTRY", "MODEL_NAMES"]
