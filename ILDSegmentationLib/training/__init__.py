"""Training and evaluation with the paper's protocol (Anthimopoulos et al. 2018, III-B/IV).

- :mod:`.manifest`: the cases (CSV ``case_id,ct,lung_mask,annotation``).
- :mod:`.annotations`: label maps or Slicer ``.seg.nrrd`` annotations -> class labels.
- :mod:`.dataset`: per-lung crops of annotated slices (the engine's own cropping) and
  the eight flips/rotations.
- :mod:`.loss`: weighted cross entropy plus the entropy term on unannotated lung.
- :mod:`.split`: per-scan folds balanced by hill climbing on class-distribution entropy.
- :mod:`.trainer`: Adam, early stopping on validation balanced accuracy, checkpoints.
- :mod:`.metrics`: balanced accuracy, confusion matrix, Dice.
"""
