"""spotfit: find fluorescent spots in microscopy images and measure them.

Conventions (used everywhere in spotfit, stated once here)
-----------------------------------------------------------
* Pixel coordinates are 0-based and refer to pixel *centres*: the centre of
  the first pixel is ``(x, y) = (0.0, 0.0)``; its area spans ``[-0.5, 0.5)``.
* ``x`` is the column index, ``y`` the row index, ``z`` the plane index.
  Arrays are indexed ``image[y, x]`` (``image[z, y, x]`` for stacks).
* Angles are in radians, widths are Gaussian sigma (not FWHM) in pixels.
* Intensities and backgrounds are in photons (photoelectrons) when the camera
  is known (``gain`` given), otherwise in ADU above the baseline.

The public API is imported lazily so that ``import spotfit`` (and the
command-line ``spotfit --help``) stays fast.

Public boundary
---------------
Public: the names below (``spotfit.fit``, ``spotfit.detect``, ...) and the
documented functions of :mod:`spotfit.config`, :mod:`spotfit.io`,
:mod:`spotfit.camera`, :mod:`spotfit.detection`, :mod:`spotfit.simulation`,
:mod:`spotfit.table`, :mod:`spotfit.export`, :mod:`spotfit.overlay`, :mod:`spotfit.blockwise`,
:mod:`spotfit.rendering`, :mod:`spotfit.match`, :mod:`spotfit.models`,
:mod:`spotfit.estimators`, :mod:`spotfit.solver`, :mod:`spotfit.results` and
:mod:`spotfit.photometry`.
Internal (may change without notice): :mod:`spotfit.api`'s helpers,
:mod:`spotfit.single`, :mod:`spotfit.group`, :mod:`spotfit.start`,
:mod:`spotfit.batch`, :mod:`spotfit.provenance`, :mod:`spotfit.pool`,
:mod:`spotfit.progress`, :mod:`spotfit.cli` and every module whose name starts
with an underscore.
"""

__version__ = "0.1.0"

_LAZY = {
    "read_image": "spotfit.io",
    "Image": "spotfit.io",
    "SpotfitInputError": "spotfit.errors",
    "SpotfitWarning": "spotfit.errors",
    "Camera": "spotfit.camera",
    "detect": "spotfit.api",
    "fit": "spotfit.api",
    "fit_spots": "spotfit.api",
    "measure": "spotfit.photometry",
    "FitConfig": "spotfit.config",
    "simulate": "spotfit.simulation",
    "write_table": "spotfit.table",
    "render": "spotfit.rendering",
    "show": "spotfit.overlay",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'spotfit' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
