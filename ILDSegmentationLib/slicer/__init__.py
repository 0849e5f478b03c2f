"""The 3D Slicer adapter: MRML nodes in and out, runs in a separate process.

- :mod:`.mrml`: every MRML operation of the module (tested on Slicer's real MRML core).
- :mod:`.background`: the panel's runs (segmentation, fine-tuning) as child processes.
- :mod:`.trainingset`: the training folder the panel fills from painted segmentations.

Nothing here is imported by the rest of the library.
"""
