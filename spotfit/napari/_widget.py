"""The napari widget: fit the chosen image layer with spotfit, add a points layer.

A magicgui front end (extra ``spotfit[napari]``) to
:func:`spotfit.napari._layers.fit_to_points`, which does the work.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from magicgui import magic_factory

from spotfit.napari._layers import fit_to_points

if TYPE_CHECKING:  # pragma: no cover
    import napari


@magic_factory(
    call_button="Fit spots",
    sigma={"min": 0.3, "max": 20.0, "step": 0.1, "label": "sigma (px)"},
    threshold={"min": 0.5, "max": 100.0, "step": 0.5, "label": "threshold (SNR)"},
    baseline={"min": -1e6, "max": 1e6, "label": "baseline (ADU)"},
    gain={"min": 0.0, "max": 1e3, "step": 0.01, "label": "gain (e-/ADU, 0: none)"},
    em_gain={"min": 1.0, "max": 1e4, "label": "EM gain"},
    read_noise={"min": 0.0, "max": 1e3, "label": "read noise (e-)"},
    axes={"label": "axes (blank: by dimension)"},
    channel={"min": -1, "max": 64, "label": "channel (-1: none)"},
    model={"choices": ["rotated", "elliptical", "symmetric"]},
)
def fit_widget(
    image: "napari.layers.Image",
    sigma: float = 1.3,
    threshold: float = 5.0,
    baseline: float = 0.0,
    gain: float = 0.0,
    em_gain: float = 1.0,
    read_noise: float = 0.0,
    invert: bool = False,
    model: str = "rotated",
    axes: str = "",
    channel: int = -1,
) -> "napari.types.LayerDataTuple":
    """Detect and fit the spots of `image`; the result is a points layer."""
    data = image.data[0] if getattr(image, "multiscale", False) else image.data
    return fit_to_points(
        data, axes=axes or None, channel=None if channel < 0 else channel,
        sigma=sigma, threshold=threshold, baseline=baseline, gain=gain or None,
        em_gain=em_gain, read_noise=read_noise, invert=invert, model=model,
        name=image.name, rgb=bool(getattr(image, "rgb", False)),
    )
