"""ILDSegmentationLib: interstitial lung disease pattern segmentation in chest CT.

A PyTorch reimplementation of the dilated fully convolutional network of
Anthimopoulos et al., "Semantic Segmentation of Pathological Lung Tissue with
Dilated Fully Convolutional Networks", IEEE JBHI 2018, with the slice-by-slice
inference engine, an automatic lung mask, file I/O and the ``ildseg`` command.

Not for clinical use.
"""
__version__ = "0.1.0"

import os as _os

# OpenMP threads that wait for work sleep instead of spinning. Must be set before
# torch is imported (its OpenMP runtime reads it once); a torch imported earlier in
# the process (e.g. by another Slicer extension) keeps its own setting. Measured on a
# 2-core machine that other processes also use: a 30-slice CT's network stage took
# 51.7 s with 2 spinning threads and 10.7 s with 2 sleeping ones (BENCHMARKS.md);
# on an idle machine, waking a sleeping thread costs microseconds per parallel region
# (estimated well under 1 % here; this shared machine is never idle to measure it).
# The user's own OMP_WAIT_POLICY wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
