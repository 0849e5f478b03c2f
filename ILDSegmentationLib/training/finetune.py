"""Fine-tuning a trained model on a few sparse annotations from the user's own scans.

The paper trains from sparse annotations (a few regions per slice; the rest of the
lung is unlabelled and feeds the entropy term), so a radiologist can teach the
network what their patients' disease looks like by painting a few regions on a few
slices. :func:`finetune` is that protocol started from a trained model:

- the network, its architecture and its intensity handling are the starting model's;
- a share of the annotations is held out (:func:`hold_out`): whole scans when there
  are enough of them, otherwise whole annotated slices (never neighbouring pixels of
  one slice: they would make the held-out figures meaningless);
- the starting model is measured on the held-out annotations *before* training, and
  the best epoch *after*, by the same crop-level measure the trainer validates with,
  so that the user sees what the fine-tuning changed;
- defaults (:class:`FinetuneSettings`) suit few annotations and a CPU, where a
  full training step costs seconds per lung crop (2 cores): only the last 1x1 block
  and the classifier learn (``train_layers="last"``, a few thousand weights), on what
  the earlier layers make of each crop, computed once; learning rate 1e-3; at most 40
  epochs, early stopping after 10 without improvement on the held-out annotations.
  ``"head"`` trains the whole 1x1 head, ``"all"`` every layer with the paper's flips
  and rotations and a learning rate a third of the paper's (for a GPU).

Classes without any painted example are not taught: the loss never asks for them,
so the fine-tuned model tends to predict them less. :func:`finetune` names them in
its report and its first lines, so the user can paint a few before relying on them.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..classes import CLASSES
from ..errors import InputError
from .dataset import Crop, class_pixel_counts, load_case_crops
from .manifest import Case

#: Scans needed before held-out annotations are whole scans rather than whole slices.
MIN_SCANS_FOR_SCAN_SPLIT = 4
#: Default Adam learning rate by the layers that learn: the paper's 1e-4 from scratch;
#: a third of it for every layer of trained weights (large steps would forget what
#: the simulator taught); 1e-3 for a few thousand head weights on fixed features.
LR_BY_LAYERS = {"last": 1e-3, "head": 1e-3, "all": 3e-5}


@dataclass
class FinetuneSettings:
    """The choices of a fine-tuning run (written into the model's provenance)."""

    epochs: int = 40
    patience: int = 10
    lr: Optional[float] = None  # None: LR_BY_LAYERS[train_layers]
    batch_size: int = 4
    crops_per_epoch: int = 0  # 0: every training crop once per epoch
    val_fraction: float = 0.25
    unsupervised_weight: float = 0.1  # paper's w_u
    intensity_augmentation: str = "none"
    seed: int = 0
    #: "last" (default): the last 1x1 block and the classifier learn, on what the
    #: earlier layers make of each crop, computed once (minutes on a CPU); "head": the
    #: whole 1x1 head (~10x the work of "last"); "all": every layer, with the paper's
    #: flips and rotations (for a GPU). The first two cannot flip or rotate.
    train_layers: str = "last"

    @property
    def learning_rate(self) -> float:
        return LR_BY_LAYERS[self.train_layers] if self.lr is None else self.lr

    def check(self) -> None:
        if self.epochs < 1:
            raise InputError(f"--epochs must be 1 or more, not {self.epochs}")
        if self.patience < 1:
            raise InputError(f"--patience must be 1 or more, not {self.patience}")
        if self.lr is not None and not (np.isfinite(self.lr) and self.lr > 0):
            raise InputError(f"--lr must be a positive number, not {self.lr}")
        if self.batch_size < 1:
            raise InputError(f"--batch-size must be 1 or more, not {self.batch_size}")
        if self.train_layers not in LR_BY_LAYERS:
            raise InputError(f"--train-layers must be one of {', '.join(LR_BY_LAYERS)}, not {self.train_layers}")
        if self.train_layers != "all" and self.intensity_augmentation != "none":
            raise InputError("--intensity-augmentation varies the crops every epoch, which needs --train-layers all")
        if not 0 < self.val_fraction < 1:
            raise InputError(f"--val-fraction must be between 0 and 1, not {self.val_fraction}")


@dataclass
class HeldOut:
    """Which annotations were held out, and how."""

    unit: str  # "scans" or "slices"
    items: List[str]  # case ids (unit "scans") or "case_id:slice" (unit "slices")


def preset_of(network_config) -> str:
    """The name of the architecture preset a model file's network config is."""
    from ..engine.network import PRESETS
    for name, config in PRESETS.items():
        if config == network_config:
            return name
    raise InputError("the starting model's architecture is none of the presets the trainer knows")


def hold_out(cases: Sequence[Case], crops_by_case: Dict[str, List[Crop]], fraction: float,
             seed: int = 0) -> Tuple[List[Crop], List[Crop], HeldOut]:
    """Split the annotated crops into training and held-out ones.

    With at least :data:`MIN_SCANS_FOR_SCAN_SPLIT` scans, whole scans are held out
    (the paper's per-scan folds, balanced by class counts). With fewer, whole
    annotated slices are held out: every k-th annotated slice of each case
    (k = round(1 / fraction)), starting at a seeded offset, so that both sides see
    every case. Both lungs of a slice always go to the same side.
    """
    scans = {c.scan_key for c in cases}
    if len(scans) >= MIN_SCANS_FOR_SCAN_SPLIT:
        from .split import split_scans
        n_folds = max(2, min(int(round(1 / fraction)), len(scans)))
        folds = split_scans(cases, {k: class_pixel_counts(v) for k, v in crops_by_case.items()}, n_folds, seed)
        held = set(folds[0])
        train = [c for k, v in crops_by_case.items() if k not in held for c in v]
        val = [c for k, v in crops_by_case.items() if k in held for c in v]
        return train, val, HeldOut("scans", sorted(held))
    step = max(2, int(round(1 / fraction)))
    rng = np.random.default_rng(seed)
    train, val, items = [], [], []
    for case_id, crops in crops_by_case.items():
        slices = sorted({c.slice_index for c in crops})
        if len(slices) < 2:
            raise InputError(f"case '{case_id}' has annotations on {len(slices)} slice: with fewer than "
                             f"{MIN_SCANS_FOR_SCAN_SPLIT} scans, annotations are held out by slice, so annotate "
                             "at least two slices of each scan (or add scans)")
        offset = int(rng.integers(step))
        chosen = set(slices[(offset % len(slices))::step]) or {slices[-1]}
        if len(chosen) == len(slices):
            chosen = {slices[-1]}
        for c in crops:
            (val if c.slice_index in chosen else train).append(c)
        items += [f"{case_id}:{z}" for z in sorted(chosen)]
    return train, val, HeldOut("slices", items)


def missing_classes(counts: np.ndarray) -> List[str]:
    """Names of the classes with no annotated pixel."""
    return [c.name for c, n in zip(CLASSES, counts) if n == 0]


def finetune(cases: Sequence[Case], start_model, out_dir: Path, settings: FinetuneSettings,
             device: str = "auto", time_limit_s: Optional[float] = None, provenance: Optional[Dict] = None,
             progress: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    """Fine-tune ``start_model`` (a :class:`~ILDSegmentationLib.engine.modelfile.LoadedModel`)
    on the annotated ``cases``; writes ``out_dir/model.safetensors`` (with the trainer's
    checkpoint, log and plots) and ``out_dir/finetune.json``; returns that report.

    The report's ``before`` and ``after`` hold the balanced accuracy, per-class
    accuracy and confusion matrix on the held-out annotations (pixels of the
    annotated slices, each lung crop run alone at the scan's own pixel size)."""
    from ..imaging.atomicfile import atomic_path
    from ..engine.device import select_device
    from ..engine.modelfile import default_model_path
    from .trainer import TrainConfig, Trainer
    from .validation import validation_metrics
    settings.check()
    say = progress or (lambda msg: None)
    out_dir = Path(out_dir)
    if out_dir.resolve() == default_model_path().parent.resolve():
        raise InputError("--out is the bundled model's folder: a fine-tuned model never replaces the bundled one; "
                         "choose a run folder of your own")
    started = time.perf_counter()
    intensity = start_model.info.intensity
    crops_by_case = {c.case_id: load_case_crops(c, intensity) for c in cases}
    train, val, held = hold_out(cases, crops_by_case, settings.val_fraction, settings.seed)
    if not train or not val:
        raise InputError("too few annotations to hold some out: annotate more slices or scans")
    train_counts, val_counts = class_pixel_counts(train), class_pixel_counts(val)
    lacking = missing_classes(train_counts)
    say(f"finetune: {settings.epochs} epochs at most, from {start_model.path.name}; "
        f"{len(train)} training crops, {len(val)} held-out crops ({held.unit}: {', '.join(held.items)})")
    say("annotated pixels for training: " + ", ".join(f"{c.name} {n}" for c, n in zip(CLASSES, train_counts)))
    if lacking:
        say("no examples of " + ", ".join(lacking) + ": the fine-tuned model is not taught these classes "
            "and may predict them less; paint a few regions of each to keep them")
    config = TrainConfig(preset=preset_of(start_model.info.network), epochs=settings.epochs,
                         patience=settings.patience, lr=settings.learning_rate,
                         unsupervised_weight=settings.unsupervised_weight, batch_size=settings.batch_size,
                         crops_per_epoch=settings.crops_per_epoch, intensity=intensity.name,
                         intensity_augmentation=settings.intensity_augmentation, seed=settings.seed,
                         device=device, trainable=settings.train_layers, augment=settings.train_layers == "all")
    torch_device = select_device(device)
    before = validation_metrics(start_model.network.to(torch_device), val, torch_device)
    say(f"before: held-out balanced accuracy {before['balanced_accuracy']:.4f}")
    provenance = {**(provenance or {}), "finetune": asdict(settings),
                  "held_out": {"unit": held.unit, "items": held.items},
                  "validation_cases": sorted({c.case_id for c in val})}
    trainer = Trainer(config, train, val, out_dir, provenance=provenance, progress=say)
    trainer.initialize_from(start_model)
    provenance["initialized_from"] = {"file": start_model.path.name, "sha256": start_model.sha256,
                                      "trained": start_model.info.trained}
    summary = trainer.fit(time_limit_s=time_limit_s)
    after = summary["validation"]
    report = {
        "start_model": {"file": str(start_model.path), "sha256": start_model.sha256},
        "model": str(trainer.model_path),
        "settings": asdict(settings),
        "held_out": {"unit": held.unit, "items": held.items},
        "annotated_pixels": {"training": dict(zip([c.name for c in CLASSES], map(int, train_counts))),
                             "held_out": dict(zip([c.name for c in CLASSES], map(int, val_counts)))},
        "classes_without_examples": lacking,
        "before": _brief(before), "after": _brief(after),
        "best_epoch": summary["best_epoch"], "epochs_run": summary["epochs_run"],
        "seconds": round(time.perf_counter() - started, 1),
    }
    with atomic_path(out_dir / "finetune.json") as tmp:
        Path(tmp).write_text(json.dumps(report, indent=2, allow_nan=False))
    say(f"after: held-out balanced accuracy {after['balanced_accuracy']:.4f} (before {before['balanced_accuracy']:.4f}); "
        f"model written to {trainer.model_path}")
    return report


def _brief(metrics: Dict[str, Any]) -> Dict[str, Any]:
    keys = ("balanced_accuracy", "accuracy", "per_class_accuracy", "dice", "confusion_matrix", "annotated_pixels")
    return {k: metrics[k] for k in keys}
