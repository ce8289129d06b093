"""napari plugin: open spotfit tables as points layers, fit the current image layer.

The npe2 manifest is ``napari.yaml`` beside this file (entry point
``napari.manifest`` in ``pyproject.toml``).  :mod:`spotfit.napari._layers`
makes napari *layer data* (plain tuples and arrays, no napari import), so the
reader and the fitting behind the widget work, and are tested, without a
display; :mod:`spotfit.napari._widget` is the magicgui front end (extra
``spotfit[napari]``).
"""
