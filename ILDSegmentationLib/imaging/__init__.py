"""Images in and out: CT files and DICOM series, label maps, geometry, the lung mask.

- :mod:`.io`: read a CT (NRRD, NIfTI, MHA, DICOM) or a lung mask, write label maps and
  probabilities; :mod:`.segfile`: Slicer ``.seg.nrrd``; :mod:`.dicomseg`: DICOM SEG.
- :mod:`.geometry`: voxel grid <-> patient space and the canonical view the engine uses.
- :mod:`.plausibility`: is this image a CT in HU at all.
- :mod:`.lungmask`: the classical automatic lung mask.
- :mod:`.atomicfile`, :mod:`.paths`: outputs written through a temporary name; path checks.
"""
