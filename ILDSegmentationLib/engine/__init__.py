"""The engine: the paper's network and how it is run on a CT.

- :mod:`.netconfig`, :mod:`.network`: the dilated FCN and the Table II presets.
- :mod:`.modelfile`: ``.safetensors`` model files with JSON metadata (never unpickled).
- :mod:`.preprocessing`: HU -> network input; :mod:`.resolution`: the pixel size the
  network runs at; :mod:`.cropping`: per-lung crops of a slice (paper III-A).
- :mod:`.decision`: how class probabilities become labels (the paper's argmax or the
  model file's whole-lung rule).
- :mod:`.inference`: slice-by-slice segmentation (:class:`~.inference.Inferer`);
  :mod:`.fastpath`: its fast CPU forward; :mod:`.device`: CPU, CUDA or MPS.

Works on arrays and their geometry (:mod:`..imaging.geometry`); reads no CT file.
"""
