"""The interactive viewer of inference outputs (viser, in the browser).

- :mod:`distill3r.viewer.scene`: reads one scene's ``infer`` outputs (PLY with per-point
  confidence and view, ``cameras.json``, ``info.json``, the input images) into arrays;
- :mod:`distill3r.viewer.app`: the viser scene: per-view clouds and camera frustums, a
  confidence-percentile slider and per-view toggles; also the static (self-contained HTML)
  export;
- :mod:`distill3r.viewer.cli`: ``main(argv)`` of ``stages/view.py``.
"""
