"""ILDSegmentationLib: interstitial lung disease pattern segmentation in chest CT.

A PyTorch reimplementation of the dilated fully convolutional network of
Anthimopoulos et al., "Semantic Segmentation of Pathological Lung Tissue with
Dilated Fully Convolutional Networks", IEEE JBHI 2018, with the slice-by-slice
inference engine, an automatic lung mask, file I/O and the ``ildseg`` command.

Not for clinical use.
"""
__version__ = "0.1.0"

# No process-wide settings here: the library is also imported inside Slicer, where the
# process and its children belong to Slicer. The ``ildseg`` command sets what it needs
# for its own process (cli.set_process_defaults).
