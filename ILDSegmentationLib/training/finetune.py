"""Fine-tuning a trained model on a few sparse annotations from the user's own scans.

The paper trains from sparse annotations (a few regions per slice; the rest of the
lung is unlabelled and feeds the entropy term), so a radiologist can teach the
network what their patients' disease looks like by painting a few regions on a few
slices. :func:`finetune` is that protocol started from a trained model:

- the network, its architecture and its intensity handling are the starting model's;
- a share of the annotations is held out (:func:`hold_out`): whole scans when there
  are two or more (what a site wants is a better model for its *next* patient, and
  only another scan says anything about that); with one scan, a slab of annotated
  slices at one end of the lung, at least ``slab_gap_mm`` (default 40 mm, more than
  the typical extent of one pattern region along the body axis) from every training
  slice, the slices in the gap used by neither side. A one-scan figure measures the
  same patient elsewhere in the lung, not the next patient: the run says so
  (:data:`ONE_SCAN_NOTE`) in its output, ``finetune.json`` and the panel;
- the starting model is measured on the held-out annotations *before* training, and
  the best epoch *after*, by the same crop-level measure the trainer validates with,
  so that the user sees what the fine-tuning changed;
- the run is pulled toward the start model so that it keeps what it was not shown
  (:class:`StartModelPull`): distillation of the start model's predictions on the
  lung that was not painted ("learning without forgetting", Li & Hoiem 2017,
  ``distill_weight``) and an L2 pull of the learning weights toward their start
  values ("L2-SP", Li et al. 2018, ``l2sp_weight``); early stopping on the held-out
  annotations keeps the best epoch;
- a fine-tuned model that does not beat the start model on the held-out annotations
  by ``min_gain`` is not offered: it is moved aside (``rejected-model.safetensors``),
  ``finetune.json`` says ``kept_start_model: true`` and ``ildseg finetune`` exits with
  :data:`KEPT_START_MODEL_EXIT` (4). The held-out annotations also choose the best
  epoch, so the "after" figure is the best of several tries: ``min_gain`` is a margin
  over that optimism, not a significance test;
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
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..classes import CLASSES
from ..errors import InputError
from .dataset import Crop, class_pixel_counts, load_case_crops
from .manifest import Case

#: Scans needed before held-out annotations are whole scans rather than a slab of one scan.
MIN_SCANS_FOR_SCAN_SPLIT = 2
#: Least distance (mm, along the body axis) between a held-out and a training slice of
#: one scan. Simulated pattern regions reach 15-36 mm from their centre in plane and
#: 0.7-1.3 times that along the body axis; a real region can be larger: this keeps
#: most regions on one side only, not all (the one-scan note says what that means).
SLAB_GAP_MM = 40.0
#: Exit status of ``ildseg finetune`` when the fine-tuned model did not beat the start
#: model on the held-out annotations (the start model stays the one to use).
KEPT_START_MODEL_EXIT = 4
#: What a one-scan hold-out measures (CLI output, finetune.json, the panel).
#: The fine-tuned model's file name in the run folder when it is not offered.
REJECTED_MODEL_NAME = "rejected-model.safetensors"
ONE_SCAN_NOTE = ("one scan only: the held-out figure comes from another part of the same patient's lung and does "
                 "not estimate how the model does on your next patient; annotate a second patient's scan for that")
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
    #: Weight of the distillation term (KL divergence from the start model's
    #: predictions on the unannotated lung, scaled like the entropy term so that 1
    #: weighs the unpainted lung as much as the painted pixels); 0: off.
    distill_weight: float = 1.0
    #: Weight of the L2-SP term: weight * sum over the learning weights of
    #: (w - w_start)^2; 0: off.
    l2sp_weight: float = 0.0
    #: Least gain in held-out balanced accuracy (absolute) for the fine-tuned model
    #: to be offered instead of the start model (below 0: offered even if that much worse).
    min_gain: float = 0.01
    #: One scan: least distance (mm) between held-out and training slices.
    slab_gap_mm: float = SLAB_GAP_MM

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
        for name, value in (("--distill-weight", self.distill_weight), ("--l2sp-weight", self.l2sp_weight),
                            ("--slab-gap", self.slab_gap_mm)):
            if not (np.isfinite(value) and value >= 0):
                raise InputError(f"{name} must be a finite number, 0 or more, not {value}")
        if not np.isfinite(self.min_gain):  # below 0: offer a model even a little worse than the start
            raise InputError(f"--min-gain must be a finite number, not {self.min_gain}")


@dataclass
class HeldOut:
    """Which annotations were held out, and how."""

    unit: str  # "scans" or "slab"
    items: List[str]  # case ids (unit "scans") or "case_id:slice" (unit "slab")
    #: Annotated slices in the gap between the slab and the training slices (used by
    #: neither side), "case_id:slice"; unit "slab" only.
    unused: List[str] = field(default_factory=list)
    gap_mm: Optional[float] = None
    #: Whether the held-out figure is one for scans the model was not taught on.
    estimates_next_patient: bool = True
    note: str = ""

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


def preset_of(network_config) -> str:
    """The name of the architecture preset a model file's network config is."""
    from ..engine.network import PRESETS
    for name, config in PRESETS.items():
        if config == network_config:
            return name
    raise InputError("the starting model's architecture is none of the presets the trainer knows")


def hold_out(cases: Sequence[Case], crops_by_case: Dict[str, List[Crop]], fraction: float,
             seed: int = 0, gap_mm: float = SLAB_GAP_MM) -> Tuple[List[Crop], List[Crop], HeldOut]:
    """Split the annotated crops into training and held-out ones.

    Two scans or more: whole scans are held out (the paper's per-scan folds, balanced
    by class counts; ~``fraction`` of the scans, at least one). One scan: a slab, the
    annotated slices at one end of the scan (~``fraction`` of them, fewer when the
    gap needs it), and for training only the slices at least ``gap_mm`` (mm along
    the body axis, slice centres) away from every held-out slice; the slices between
    are used by neither side. The end that keeps more training slices is held out
    (a seeded choice on a tie). Both lungs of a slice always go to the same side.
    """
    scans = {c.scan_key for c in cases}
    if len(scans) >= MIN_SCANS_FOR_SCAN_SPLIT:
        from .split import split_scans
        n_folds = max(2, min(int(round(1 / fraction)), len(scans)))
        folds = split_scans(cases, {k: class_pixel_counts(v) for k, v in crops_by_case.items()}, n_folds, seed)
        held = set(folds[0])
        train = [c for k, v in crops_by_case.items() if k not in held for c in v]
        val = [c for k, v in crops_by_case.items() if k in held for c in v]
        n_held = len({c.scan_key for c in cases if c.case_id in held})
        note = ("held out whole scans: a figure for scans the model was not taught on"
                + (" (one scan: a rough one)" if n_held == 1 else ""))
        return train, val, HeldOut("scans", sorted(held), note=note)
    crops = [c for v in crops_by_case.values() for c in v]
    spacing = {c.slice_index: c.slice_spacing_mm or 1.0 for c in crops}  # unknown spacing: 1 mm
    slices = sorted(spacing)
    if len(slices) < 2:
        raise InputError(f"the one annotated scan has annotations on {len(slices)} slice: with one scan, a slab of "
                         f"slices is held out, so annotate at least two slices {gap_mm:g} mm apart (or add a scan)")
    z = {k: k * spacing[k] for k in slices}
    target = max(1, int(round(fraction * len(slices))))
    choice = None
    for k in range(target, 0, -1):
        options = []
        for end, held in (("low", slices[:k]), ("high", slices[-k:])):
            edge = z[held[-1]] if end == "low" else z[held[0]]
            far = [s for s in slices if s not in held and abs(z[s] - edge) >= gap_mm - 1e-6]
            if far:
                options.append((len(far), end, held, far))
        if options:
            most = max(o[0] for o in options)
            best = [o for o in options if o[0] == most]
            choice = best[int(np.random.default_rng(seed).integers(len(best)))]
            break
    if choice is None:
        span = z[slices[-1]] - z[slices[0]]
        raise InputError(f"the one annotated scan's annotated slices span {span:.0f} mm: too little to hold out a "
                         f"slab {gap_mm:g} mm from every training slice; annotate slices further apart (at least "
                         "two slices that far apart), add a scan, or lower --slab-gap")
    _, _, held, far = choice
    held, far = set(held), set(far)
    train = [c for c in crops if c.slice_index in far]
    val = [c for c in crops if c.slice_index in held]
    label = lambda zs: [f"{cid}:{s}" for cid, v in crops_by_case.items()  # noqa: E731
                        for s in sorted({c.slice_index for c in v if c.slice_index in zs})]
    unused = set(slices) - held - far
    return train, val, HeldOut("slab", label(held), label(unused), gap_mm, False, ONE_SCAN_NOTE)


def distillation_term(logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor,
                      lung: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Learning without forgetting on the lung that was not painted: per crop, the sum
    over its unannotated lung pixels of KL(p_start || p) (nats), divided by the
    number of its lung pixels that take part in the paper's loss (annotated and
    unannotated, as :func:`~.loss.ild_loss` divides); the mean over the crops.

    logits, teacher_logits (N, C, H, W); target (N, H, W) class or -1; lung (N, H, W)
    bool; valid (N, 1, H, W) 0/1 real pixels of a padded batch, or None."""
    import torch.nn.functional as F
    inside = lung if valid is None else lung & (valid[:, 0] > 0)
    unlabeled = inside & (target < 0)
    logp = F.log_softmax(logits.float(), dim=1)
    logq = F.log_softmax(teacher_logits.float(), dim=1)
    kl = (logq.exp() * (logq - logp)).sum(dim=1)  # (N, H, W)
    per_crop = (kl * unlabeled).sum(dim=(1, 2)) / inside.sum(dim=(1, 2)).clamp_min(1)
    return per_crop.mean()


class StartModelPull:
    """The extra loss term that keeps a fine-tuned model near its start
    (the :class:`~.trainer.Trainer`'s ``regularizer``):

    ``distill_weight * alpha * distillation_term(p, p_start)`` (alpha: the trainer's
    entropy scale, labelled / unlabelled lung pixels of the training set, so that
    weight 1 gives the unpainted lung the painted pixels' total weight) plus
    ``l2sp_weight * sum((w - w_start)^2)`` over the weights that learn.

    The start model's predictions come from a frozen copy run on what the network
    read at this step (the cached head input when only the head learns, the flipped or
    rotated crop otherwise), in evaluation mode."""

    def __init__(self, start_network: "torch.nn.Module", distill_weight: float, l2sp_weight: float,
                 alpha: float = 1.0) -> None:
        import copy
        self.distill_weight, self.l2sp_weight, self.alpha = float(distill_weight), float(l2sp_weight), float(alpha)
        self.teacher = copy.deepcopy(start_network).eval() if distill_weight > 0 else None
        if self.teacher is not None:
            for p in self.teacher.parameters():
                p.requires_grad_(False)
        self.start = {n: p.detach().clone() for n, p in start_network.named_parameters()}

    def __call__(self, batch) -> "torch.Tensor":
        import torch
        total = batch.logits.new_zeros((), dtype=torch.float32)
        if self.teacher is not None:
            with torch.no_grad():
                if batch.head_start is None:
                    teacher = self.teacher(batch.inputs, batch.valid)
                else:
                    teacher = self.teacher.classify(batch.inputs, batch.valid, batch.head_start)
            total = total + self.distill_weight * self.alpha * distillation_term(
                batch.logits, teacher, batch.target, batch.lung, batch.valid)
        if self.l2sp_weight > 0:
            total = total + self.l2sp_weight * l2sp_term(batch.network, self.start)
        return total


def l2sp_term(network: torch.nn.Module, start: Dict[str, torch.Tensor]) -> torch.Tensor:
    """sum over the weights that learn (requires_grad) of (w - w_start)^2."""
    import torch
    terms = [((p - start[n].to(p.device)) ** 2).sum() for n, p in network.named_parameters() if p.requires_grad]
    return torch.stack(terms).sum() if terms else torch.zeros(())


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
    train, val, held = hold_out(cases, crops_by_case, settings.val_fraction, settings.seed, settings.slab_gap_mm)
    if not train or not val:
        raise InputError("too few annotations to hold some out: annotate more slices or scans")
    train_counts, val_counts = class_pixel_counts(train), class_pixel_counts(val)
    lacking = missing_classes(train_counts)
    say(f"finetune: {settings.epochs} epochs at most, from {start_model.path.name}; "
        f"{len(train)} training crops, {len(val)} held-out crops ({held.unit}: {', '.join(held.items)})"
        + (f"; {len(held.unused)} annotated slices within {held.gap_mm:g} mm of the slab used by neither side"
           if held.unit == "slab" else ""))
    say(("WARNING: " if not held.estimates_next_patient else "") + held.note)
    unheld = [c.name for c, n, m in zip(CLASSES, val_counts, train_counts) if n == 0 and m > 0]
    if unheld:
        say("the held-out annotations have no " + ", ".join(unheld) + ": the before/after figure (and the choice "
            "of the start or the fine-tuned model) says nothing about those classes")
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
    pull = None
    if settings.distill_weight > 0 or settings.l2sp_weight > 0:
        pull = StartModelPull(start_model.network, settings.distill_weight, settings.l2sp_weight)
    trainer = Trainer(config, train, val, out_dir, provenance=provenance, progress=say, regularizer=pull)
    if pull is not None:
        pull.alpha = trainer.alpha  # the entropy term's scale: labelled / unlabelled lung pixels
    trainer.initialize_from(start_model)
    provenance["initialized_from"] = {"file": start_model.path.name, "sha256": start_model.sha256,
                                      "trained": start_model.info.trained}
    summary = trainer.fit(time_limit_s=time_limit_s)
    after = summary["validation"]
    gain = after["balanced_accuracy"] - before["balanced_accuracy"]
    kept_start = not gain >= settings.min_gain  # a NaN figure keeps the start model too
    model_path: Optional[Path] = trainer.model_path
    rejected: Optional[Path] = None
    if kept_start:
        # Not offered: the panel and list_models find run folders by model.safetensors.
        rejected = out_dir / REJECTED_MODEL_NAME
        os.replace(trainer.model_path, rejected)
        model_path = None
    report = {
        "start_model": {"file": str(start_model.path), "sha256": start_model.sha256},
        "model": None if model_path is None else str(model_path),
        "kept_start_model": kept_start,
        "rejected_model": None if rejected is None else str(rejected),
        "gain": gain if np.isfinite(gain) else None, "min_gain": settings.min_gain,
        "settings": asdict(settings),
        "held_out": held.as_dict(),
        "annotated_pixels": {"training": dict(zip([c.name for c in CLASSES], map(int, train_counts))),
                             "held_out": dict(zip([c.name for c in CLASSES], map(int, val_counts)))},
        "classes_without_examples": lacking,
        "classes_taught_but_not_held_out": unheld,
        "before": _brief(before), "after": _brief(after),
        "best_epoch": summary["best_epoch"], "epochs_run": summary["epochs_run"],
        "seconds": round(time.perf_counter() - started, 1),
    }
    with atomic_path(out_dir / "finetune.json") as tmp:
        Path(tmp).write_text(json.dumps(report, indent=2, allow_nan=False))
    figures = (f"held-out balanced accuracy {after['balanced_accuracy']:.4f} after, "
               f"{before['balanced_accuracy']:.4f} before")
    if kept_start:
        say(f"after: {figures}: not better than the start model by {settings.min_gain:g}; keep using the start "
            f"model {start_model.path.name} (the fine-tuned one is set aside as {rejected})")
    else:
        say(f"after: {figures}; model written to {trainer.model_path}")
    if not held.estimates_next_patient:
        say("WARNING: " + held.note)
    return report


def _brief(metrics: Dict[str, Any]) -> Dict[str, Any]:
    keys = ("balanced_accuracy", "accuracy", "per_class_accuracy", "dice", "confusion_matrix", "annotated_pixels")
    return {k: metrics[k] for k in keys}
