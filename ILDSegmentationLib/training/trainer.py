"""The training loop (paper, III-B and IV-B).

Adam (lr 1e-4), one crop per step by default, each crop flipped/rotated by one of
the eight transformations per epoch, early stopping when the validation balanced
accuracy has not improved by at least 0.5 % (relative) for 50 epochs, keeping the
best weights. A checkpoint (weights, optimizer state, history) is written every
epoch as one safetensors file; ``resume`` continues from it. Every random choice of
an epoch is drawn from a generator seeded by (seed, epoch), so a resumed run on the
CPU ends with the same weights as an uninterrupted one.

Several GPUs: launch with ``torchrun --nproc_per_node N -m ILDSegmentationLib train
...``; each process trains on its share of the epoch's crops under
DistributedDataParallel, and only rank 0 writes files.
"""
from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..imaging.atomicfile import atomic_path
from ..classes import NUM_CLASSES
from ..engine.device import select_device
from ..errors import InputError
from ..engine.modelfile import LoadedModel, ModelInfo, save_model, weights_checksum
from ..engine.network import PRESETS, DilatedFCN
from ..engine.preprocessing import INTENSITY_PRESETS
from .augment import INTENSITY_AUGMENTATIONS, scanner_variation
from .batching import passes, prefetch, transformed
from .dataset import Crop, class_pixel_counts
from .loss import class_weights, entropy_scale, ild_loss
from .metrics import confusion_matrix, summarize
from .validation import validation_metrics

log = logging.getLogger(__name__)

TRAINABLE = ("all", "head", "last")
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class TrainConfig:
    """Every choice of a run; written into the model's provenance."""

    preset: str = "proposed"
    epochs: int = 1000  # upper bound; early stopping usually ends the run first
    patience: int = 50
    min_rel_improvement: float = 0.005
    lr: float = 1e-4
    unsupervised_weight: float = 0.1  # w_u; "purely-supervised" sets 0
    entropy_scaling: str = "ratio"
    batch_size: int = 1
    crops_per_epoch: int = 0  # 0: every crop once per epoch (paper); N: a seeded random N per epoch
    augment: bool = True
    #: "none" (paper: flips/rotations only) or "scanner": a random kernel and noise per
    #: crop and epoch (training/augment.py), for training data from few scanners.
    intensity_augmentation: str = "none"
    intensity: str = "hu"
    seed: int = 0
    device: str = "auto"
    #: Checksum of the weights that start the run (``weights_checksum``: names, shapes
    #: and float32 bytes; "" = He-normal init, as in the paper); part of the config so
    #: a resumed fine-tuning run must name them again. The weights, not the file: a
    #: model whose metadata changed (its decision rule, say) starts the same run.
    init_sha256: str = ""
    #: Which weights learn: "all" (the paper); "head" (the 1x1 head and classifier, on
    #: texture features computed once per crop); "last" (the last 1x1 block and the
    #: classifier, on the earlier head's output computed once: ~10x cheaper than
    #: "head"). The two latter are for fine-tuning on a CPU (training/finetune.py) and
    #: cannot flip, rotate or vary crops per epoch.
    trainable: str = "all"
    #: Arithmetic of the forward and backward passes: "fp32"; "bf16" (autocast: the
    #: convolutions in bfloat16, the instance-norm statistics, the loss and the
    #: weights in float32); "auto" (default): bf16 where the device computes it
    #: natively (a CPU with AVX512-BF16/AMX, a CUDA GPU with bf16), else fp32. The
    #: paper trained in float32; bf16 measured 1.8x faster per step on a 2-core AMD EPYC,
    #: gradients agreeing with fp32 to a cosine >= 0.99 (test_trainer_speed.py).
    precision: str = "auto"
    #: False runs the reference implementation: padded batches through the masked
    #: norm, the loss read back every step, validation crop by crop through the
    #: network's own forward. Same protocol; kept to check the fast paths against it
    #: and for ``ildseg bench`` to measure both.
    fast: bool = True

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise InputError(f"unknown preset '{self.preset}' (choose from {', '.join(PRESETS)})")
        if self.intensity not in INTENSITY_PRESETS:
            raise InputError(f"unknown intensity '{self.intensity}' (choose from {', '.join(INTENSITY_PRESETS)})")
        if self.intensity_augmentation not in INTENSITY_AUGMENTATIONS:
            raise InputError(f"unknown intensity augmentation '{self.intensity_augmentation}' "
                             f"(choose from {', '.join(INTENSITY_AUGMENTATIONS)})")
        for name, value, ok in (("--epochs", self.epochs, self.epochs >= 1),
                                ("--patience", self.patience, self.patience >= 1),
                                ("--batch-size", self.batch_size, self.batch_size >= 1),
                                ("--crops-per-epoch", self.crops_per_epoch, self.crops_per_epoch >= 0),
                                ("--lr", self.lr, math.isfinite(self.lr) and self.lr > 0),
                                ("--unsupervised-weight", self.unsupervised_weight,
                                 math.isfinite(self.unsupervised_weight) and self.unsupervised_weight >= 0),
                                ("--min-rel-improvement", self.min_rel_improvement,
                                 math.isfinite(self.min_rel_improvement) and self.min_rel_improvement >= 0)):
            if not ok:
                rule = {"--crops-per-epoch": "0 (all crops) or more", "--lr": "a finite number above 0",
                        "--unsupervised-weight": "a finite number, 0 or more",
                        "--min-rel-improvement": "a finite number, 0 or more"}.get(name, "1 or more")
                raise InputError(f"{name} must be {rule}, not {value}")
        if self.precision not in PRECISIONS:
            raise InputError(f"unknown precision '{self.precision}' (choose from {', '.join(PRECISIONS)})")
        if self.trainable not in TRAINABLE:
            raise InputError(f"unknown trainable layers '{self.trainable}' (choose from {', '.join(TRAINABLE)})")
        if self.trainable != "all" and (self.augment or self.intensity_augmentation != "none"):
            raise InputError("training the head only computes each crop's features once, so it cannot flip, rotate "
                             "or vary the crops per epoch: turn augmentation off")
        if self.preset == "purely-supervised":
            self.unsupervised_weight = 0.0


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float
    val_bacc: float
    val_accuracy: float
    seconds: float
    crops_per_second: float
    best: bool


@dataclass
class RegularizerBatch:
    """What an extra loss term (:class:`Trainer`'s ``regularizer``) sees of one step.

    inputs: what the network read, (N, 1, H, W) images or, when only the head learns,
    the cached (N, C, H, W) input of head block ``head_start`` (None: the whole
    network learns); valid: (N, 1, H, W) 0/1 real pixels of a padded batch, or None;
    logits: (N, 6, H, W); target: (N, H, W) class index or -1; lung: (N, H, W) bool.
    """

    network: DilatedFCN
    inputs: torch.Tensor
    valid: Optional[torch.Tensor]
    logits: torch.Tensor
    target: torch.Tensor
    lung: torch.Tensor
    head_start: Optional[int]


def _distributed() -> Tuple[int, int]:
    """(rank, world size); initializes the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world


def _pad_features(features: Sequence[torch.Tensor], crops: Sequence[Crop]):
    """Cached features (C, h, w) of crops padded to one shape, as :func:`_pad_batch`
    pads images: zero features and a ``valid`` mask outside each crop."""
    h = max(f.shape[1] for f in features)
    w = max(f.shape[2] for f in features)
    n, channels = len(features), features[0].shape[0]
    x = torch.zeros((n, channels, h, w), dtype=torch.float32)
    t = torch.full((n, h, w), -1, dtype=torch.int64)
    lung = torch.zeros((n, h, w), dtype=torch.bool)
    valid = torch.zeros((n, 1, h, w), dtype=torch.float32)
    for i, (f, c) in enumerate(zip(features, crops)):
        x[i, :, :f.shape[1], :f.shape[2]] = f.float()
        t[i, :f.shape[1], :f.shape[2]] = torch.from_numpy(c.target)
        lung[i, :f.shape[1], :f.shape[2]] = torch.from_numpy(c.lung)
        valid[i, 0, :f.shape[1], :f.shape[2]] = 1
    same = all(f.shape == features[0].shape for f in features)
    return x, t, lung, None if same else valid


class Trainer:
    def __init__(self, config: TrainConfig, train: Sequence[Crop], val: Sequence[Crop], out_dir: Path,
                 provenance: Optional[Dict[str, Any]] = None,
                 progress: Optional[Callable[[str], None]] = None,
                 regularizer: Optional[Callable[[RegularizerBatch], torch.Tensor]] = None) -> None:
        if not train or not val:
            raise InputError("training needs at least one annotated crop in the training and validation sets")
        self.config = config
        self.train, self.val = list(train), list(val)
        if config.intensity_augmentation != "none":
            # Validation sees one fixed variation per crop, so that choosing the best
            # epoch rewards what the augmentation is for: robustness to the scanner.
            intensity = INTENSITY_PRESETS[config.intensity]
            self.val = [dataclasses.replace(c, image=scanner_variation(
                c.image, intensity, np.random.default_rng([config.seed, j, 2]))[0]) for j, c in enumerate(self.val)]
        self.out = Path(out_dir)
        self.provenance = provenance or {}
        self.progress = progress or (lambda msg: None)
        #: An extra loss term added to the paper's at every step (fine-tuning's pull
        #: toward the start model, training/finetune.py); None: the paper's loss alone.
        self.regularizer = regularizer
        self.rank, self.world = _distributed()
        self.device = select_device(config.device)
        if self.world > 1 and self.device.type == "cuda":
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if self.device.type == "cuda" and config.fast:
            # Buckets keep the shapes few, so cuDNN's per-shape kernel search pays off.
            torch.backends.cudnn.benchmark = True
        counts = class_pixel_counts(self.train)
        self.weights = class_weights(counts).to(self.device)
        labeled = int(counts.sum())
        unlabeled = int(sum(((c.target < 0) & c.lung).sum() for c in self.train))
        self.alpha = entropy_scale(labeled, unlabeled, config.entropy_scaling)
        self.class_counts = counts
        torch.manual_seed(config.seed)
        self.network = DilatedFCN(PRESETS[config.preset]).to(self.device)
        self.model = self.network
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel
            self.model = DistributedDataParallel(self.network, device_ids=[self.device.index]
                                                 if self.device.type == "cuda" else None)
        self.optimizer = torch.optim.Adam(self.network.parameters(), lr=config.lr)
        self.history: List[EpochRecord] = []
        self.best_bacc = -1.0
        self.best_epoch = -1
        self.best_state: Optional[Dict[str, torch.Tensor]] = None
        self.inherited_pixel_spacing: Optional[Tuple[float, float]] = None  # of an --init model
        self.start_epoch = 0
        # trainable="head": each crop's features, computed once when fit() starts (after
        # initialize_from), kept in float16 on the CPU to halve their memory.
        self._features: Dict[str, List[torch.Tensor]] = {}

    def initialize_from(self, model: LoadedModel) -> None:
        """Start from a trained model's weights (fine-tuning) instead of a random init.

        The model must have this run's architecture and intensity handling: weights
        learned on other inputs would start the run from a meaningless point.
        """
        if model.info.network != self.network.config:
            raise InputError(f"--init model {model.path.name} is not the '{self.config.preset}' architecture")
        if model.info.intensity.name != self.config.intensity:
            raise InputError(f"--init model {model.path.name} uses intensity '{model.info.intensity.name}', "
                             f"this run '{self.config.intensity}' (pass --intensity {model.info.intensity.name})")
        self.network.load_state_dict(model.network.state_dict())
        self.config.init_sha256 = weights_checksum(model.network.state_dict())
        # Checkpoints written before the weights' checksum named the file instead.
        self._init_file_sha256 = model.sha256
        # Fine-tuned weights still know the pixel sizes they first learned at.
        self.inherited_pixel_spacing = model.info.pixel_spacing_mm

    # -- files ----------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.safetensors"

    @property
    def model_path(self) -> Path:
        return self.out / "model.safetensors"

    def _save_checkpoint(self, epoch: int) -> None:
        from safetensors.torch import save_file
        tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in self.network.state_dict().items()}
        if self.best_state is not None:
            tensors.update({f"best.{k}": v.contiguous() for k, v in self.best_state.items()})
        opt = self.optimizer.state_dict()
        for idx, st in opt["state"].items():
            for name, value in st.items():
                tensors[f"optim.{idx}.{name}"] = torch.as_tensor(value).detach().cpu().float().reshape(-1) \
                    if name == "step" else value.detach().cpu().contiguous()
        meta = {"epoch": epoch, "best_bacc": self.best_bacc, "best_epoch": self.best_epoch,
                "config": asdict(self.config), "data": self._data_identity(),
                "history": [asdict(r) for r in self.history], "param_groups": opt["param_groups"]}
        with atomic_path(self.checkpoint_path) as tmp:
            save_file(tensors, tmp, metadata={"ildseg_checkpoint": json.dumps(meta)})

    def _data_identity(self) -> Dict[str, Any]:
        """What the run trains on, besides its settings: a resumed run must match it.
        The start weights are a setting (``init_sha256``, their checksum); the model
        file's own hash in the provenance would change with its metadata."""
        keys = ("manifest_sha256", "validation_cases", "folds", "fold", "val_fraction")
        return {k: self.provenance.get(k) for k in keys}

    def _remove_stale_temporaries(self) -> None:
        """A run killed outright (SIGKILL, power loss) while writing can leave the
        temporary file of a write-then-rename beside its target; the target itself is
        intact. Resuming removes them, so the run folder holds only real outputs."""
        for name in (self.checkpoint_path.name, self.model_path.name, "log.csv", "summary.json",
                     "learning_curves.png", "confusion.png"):
            for leftover in self.out.glob(f".{name}.*.part*"):
                leftover.unlink(missing_ok=True)

    def resume(self) -> bool:
        """Continue from the checkpoint in the run folder; False when there is none."""
        if not self.checkpoint_path.exists():
            return False
        if self.rank == 0:
            self._remove_stale_temporaries()
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(str(self.checkpoint_path), framework="pt") as f:
                meta = json.loads(f.metadata()["ildseg_checkpoint"])
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, KeyError, TypeError, ValueError) as e:
            raise InputError(f"the checkpoint {self.checkpoint_path} is damaged ({type(e).__name__}): "
                             "remove it to start again, or use a new --out folder") from None
        # The epoch limit may grow and the device change; every other setting shapes
        # the run and must match.
        # The precision and the implementation change how fast, not what, a run learns:
        # a run moved from a GPU to a CPU goes on with what that machine does best.
        resumable = lambda d: {k: v for k, v in d.items()  # noqa: E731
                               if k not in ("epochs", "device", "precision", "fast")}
        # Settings added since the checkpoint was written take their defaults.
        saved = {**asdict(TrainConfig()), **meta["config"]}
        if saved["init_sha256"] and saved["init_sha256"] == getattr(self, "_init_file_sha256", None):
            saved["init_sha256"] = self.config.init_sha256
        if resumable(saved) != resumable(asdict(self.config)):
            raise InputError("the checkpoint in the run folder was made with other settings; "
                             "use a new --out folder or the same options")
        # Checkpoints written before this check carry no "data" and are taken as they are.
        data = meta.get("data")
        if data is not None:
            changed = [k for k, v in self._data_identity().items() if data.get(k) != v]
            if changed:
                raise InputError(f"the checkpoint in the run folder was made on other data or another split "
                                 f"({', '.join(changed)} differ); use a new --out folder or the same manifest "
                                 "and options")
        self.network.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        best = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
        self.best_state = best or None
        state: Dict[int, Dict[str, torch.Tensor]] = {}
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, idx, name = k.split(".", 2)
                state.setdefault(int(idx), {})[name] = v.reshape(()) if name == "step" else v.to(self.device)
        self.optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        self.history = [EpochRecord(**r) for r in meta["history"]]
        self.best_bacc, self.best_epoch = meta["best_bacc"], meta["best_epoch"]
        self.start_epoch = meta["epoch"] + 1
        return True

    def _write_log(self) -> None:
        with atomic_path(self.out / "log.csv") as tmp:
            with open(tmp, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(list(asdict(self.history[0]).keys()) if self.history else [])
                for r in self.history:
                    # Epochs count from 1 wherever a user reads them (log, summary, model
                    # file, messages); the loop and the checkpoint count from 0.
                    w.writerow(list({**asdict(r), "epoch": r.epoch + 1}.values()))

    # -- loop -------------------------------------------------------------------------
    def _epoch(self, epoch: int) -> float:
        cfg = self.config
        rng = np.random.default_rng([cfg.seed, epoch])
        torch.manual_seed(cfg.seed * 1_000_003 + epoch)  # dropout
        order = rng.permutation(len(self.train))
        if cfg.crops_per_epoch:
            # Large data sets on a CPU: an "epoch" of N random crops keeps the
            # validation (and early stopping) cadence useful.
            order = order[:cfg.crops_per_epoch]
        ks = rng.integers(0, 8, len(self.train)) if cfg.augment else np.zeros(len(self.train), np.int64)
        if self.world > 1:  # DistributedDataParallel needs the same number of steps on every rank
            usable = len(order) - len(order) % (self.world * cfg.batch_size)
            if usable == 0:
                raise InputError(f"{len(order)} training crops are too few for {self.world} processes "
                                 f"with batches of {cfg.batch_size}")
            order = order[:usable][self.rank::self.world]
        self.model.train()
        steps = [[int(j) for j in order[i:i + cfg.batch_size]] for i in range(0, len(order), cfg.batch_size)]
        if cfg.trainable != "all":
            return self._head_epoch(steps)
        layout = "padded" if not cfg.fast else ("grouped" if self.device.type == "cpu" else "bucket")

        def prepare(idx: List[int]):
            return passes(transformed([self._training_crop(epoch, j) for j in idx], [int(ks[j]) for j in idx]),
                          layout)
        # Summed on the device and read once per epoch: no host synchronisation per step.
        total = torch.zeros((), device=self.device)
        for step_passes in (prefetch(steps, prepare) if cfg.fast else map(prepare, steps)):
            self.optimizer.zero_grad(set_to_none=True)
            for b in step_passes:
                b = b.to(self.device)
                with self._autocast():
                    logits = self.model(b.x, b.valid) if b.valid is not None else self.model(b.x)
                loss = ild_loss(logits, b.target, b.lung, self.weights, cfg.unsupervised_weight, self.alpha,
                                None if b.valid is None else b.valid[:, 0] > 0)
                if self.regularizer is not None:
                    # Added per pass, like the paper's loss: the shares of a step sum to 1, so
                    # a per-crop mean (distillation) is the step's mean and a term of the
                    # weights alone (L2-SP) counts once per step, as in one padded pass.
                    loss = loss + self.regularizer(RegularizerBatch(self.network, b.x, b.valid, logits, b.target,
                                                                    b.lung, None))
                (loss * b.share).backward()
                total += loss.detach() * b.share
            self.optimizer.step()
            if not cfg.fast:
                float(total)  # the reference reads the loss back every step, as it always did
        return float(total) / len(steps) if steps else float("nan")

    def run_epoch(self, epoch: int) -> Tuple[float, Dict[str, Any]]:
        """Train epoch ``epoch`` (from 0) and validate: (mean training loss, validation
        metrics). What :meth:`fit` repeats, without its files or stopping rule."""
        loss = self._epoch(epoch)
        return loss, self._validate()

    def _head_epoch(self, steps: List[List[int]]) -> float:
        """An epoch of the head-only training: what the trained layers read was
        computed once per crop (no flips, no per-epoch variation)."""
        cfg = self.config
        total = torch.zeros((), device=self.device)
        for idx in steps:
            x, t, lung, valid = _pad_features([self._features["train"][j] for j in idx],
                                              [self.train[j] for j in idx])
            x, t, lung = x.to(self.device), t.to(self.device), lung.to(self.device)
            valid = None if valid is None else valid.to(self.device)
            logits = self.network.classify(x, valid, self._head_start)
            loss = ild_loss(logits, t, lung, self.weights, cfg.unsupervised_weight, self.alpha,
                            None if valid is None else valid[:, 0] > 0)
            if self.regularizer is not None:  # on the cached head input: the head alone learns
                loss = loss + self.regularizer(RegularizerBatch(self.network, x, valid, logits, t, lung,
                                                                self._head_start))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            total += loss.detach()
        return float(total) / len(steps) if steps else float("nan")

    @property
    def precision(self) -> str:
        """The precision this run computes in ("fp32" or "bf16"), ``auto`` resolved."""
        if self.config.precision != "auto":
            return self.config.precision
        if self.device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        if self.device.type == "cpu":
            mkldnn = getattr(torch.ops, "mkldnn", None)
            native = mkldnn is not None and hasattr(mkldnn, "_is_mkldnn_bf16_supported") \
                and bool(mkldnn._is_mkldnn_bf16_supported())
            return "bf16" if native else "fp32"
        return "fp32"

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    def _training_crop(self, epoch: int, j: int) -> Crop:
        """Training crop j as this epoch sees it (before the flip/rotation)."""
        crop = self.train[j]
        if self.config.intensity_augmentation == "none":
            return crop
        # Drawn per (seed, epoch, crop), not from the epoch's stream, so the result
        # does not depend on how crops are shared among processes. Keys end in a
        # non-zero tag: numpy reads [a, b, 0] as [a, b], which would make this stream
        # the epoch's shuffle or a validation crop's.
        rng = np.random.default_rng([self.config.seed, epoch, j, 1])
        image, _ = scanner_variation(crop.image, INTENSITY_PRESETS[self.config.intensity], rng)
        return dataclasses.replace(crop, image=image)

    def fit(self, time_limit_s: Optional[float] = None) -> Dict[str, Any]:
        """Train until early stopping, the epoch limit, or (``time_limit_s``, wall-clock
        seconds from this call) the first epoch that ends past the time limit; the best
        weights are kept in every case. The time limit is not a training setting (a
        resumed run may be given another): it only says when to stop."""
        cfg = self.config
        started = time.perf_counter()
        if self.rank == 0:
            try:
                self.out.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise InputError(f"cannot make the run folder {self.out}: {e.strerror or e}") from None
        if cfg.trainable != "all":
            self._prepare_head_training()
        since_best = len(self.history) - 1 - max([i for i, r in enumerate(self.history) if r.best], default=-1) \
            if self.history else 0
        for epoch in range(self.start_epoch, cfg.epochs):
            if since_best >= cfg.patience:
                break
            t0 = time.perf_counter()
            train_loss, metrics = self.run_epoch(epoch)
            bacc = metrics["balanced_accuracy"]
            improved = self.best_epoch < 0 or bacc >= self.best_bacc * (1 + cfg.min_rel_improvement)
            if improved:
                self.best_bacc, self.best_epoch = bacc, epoch
                self.best_state = {k: v.detach().cpu().clone() for k, v in self.network.state_dict().items()}
                since_best = 0
            else:
                since_best += 1
            seconds = time.perf_counter() - t0
            n_crops = min(cfg.crops_per_epoch or len(self.train), len(self.train))
            self.history.append(EpochRecord(epoch, train_loss, bacc, metrics["accuracy"], round(seconds, 3),
                                            round(n_crops / seconds, 3), improved))
            if self.rank == 0:
                self._save_checkpoint(epoch)
                self._write_log()
            self.progress(f"epoch {epoch + 1}: loss {train_loss:.4f}, validation BACC {bacc:.4f}"
                          f"{' (best)' if improved else ''}, {seconds:.1f} s")
            if time_limit_s is not None and time.perf_counter() - started >= time_limit_s:
                self.progress(f"time limit of {time_limit_s:g} s reached after epoch {epoch + 1}")
                break
        return self._finish()

    @property
    def _head_start(self) -> int:
        """The first head block that learns (trainable "head" or "last")."""
        return 0 if self.config.trainable == "head" else max(len(self.network.head) - 1, 0)

    def _prepare_head_training(self) -> None:
        """Freeze all but the trained head layers and compute what they read once per crop."""
        for p in self.network.parameters():
            p.requires_grad_(False)
        for p in self.network.head_parameters(self._head_start):
            p.requires_grad_(True)
        if self._features:
            return
        self.network.eval()
        with torch.inference_mode():
            for name, crops in (("train", self.train), ("val", self.val)):
                self._features[name] = [
                    self.network.head_input(torch.from_numpy(c.image)[None, None].to(self.device),
                                            start=self._head_start)[0].to("cpu", torch.float16) for c in crops]
        self.progress(f"features of {len(self.train) + len(self.val)} crops computed once; training "
                      f"{sum(p.numel() for p in self.network.head_parameters(self._head_start))} weights of the head")

    def _validate(self) -> Dict[str, Any]:
        if self.config.trainable == "all":
            return validation_metrics(self.network, self.val, self.device, fast=self.config.fast,
                                      autocast=self._autocast())
        self.network.eval()
        cm = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
        with torch.inference_mode():
            for f, c in zip(self._features["val"], self.val):
                logits = self.network.classify(f.float()[None].to(self.device), start=self._head_start)
                pred = logits.argmax(dim=1)[0].cpu().numpy() + 1
                truth = np.where(c.target >= 0, c.target + 1, 0)
                cm += confusion_matrix(truth, np.where(c.lung, pred, 0))
        return summarize(cm)

    def _finish(self) -> Dict[str, Any]:
        if self.best_state is not None:
            self.network.load_state_dict(self.best_state)
        metrics = self._validate()
        summary = {
            "best_epoch": self.best_epoch + 1, "epochs_run": len(self.history),
            "validation": metrics, "class_pixel_counts_train": self.class_counts.tolist(),
            "entropy_alpha": self.alpha,
        }
        if self.rank == 0:
            spacings = [v for c in self.train if c.pixel_spacing_mm is not None for v in c.pixel_spacing_mm]
            if spacings and self.inherited_pixel_spacing is not None:
                spacings += list(self.inherited_pixel_spacing)
            info = ModelInfo(
                name=f"ILD dilated FCN ({self.config.preset})", network=self.network.config,
                intensity=INTENSITY_PRESETS[self.config.intensity], trained=True,
                pixel_spacing_mm=(min(spacings), max(spacings)) if spacings else None,
                provenance={**self.provenance, "created": datetime.datetime.now().isoformat(timespec="seconds"),
                            "training": asdict(self.config), "best_epoch": self.best_epoch + 1,
                            "epochs_run": len(self.history),
                            "validation_balanced_accuracy": metrics["balanced_accuracy"],
                            "validation_per_class_accuracy": metrics["per_class_accuracy"],
                            "validation_confusion_matrix": metrics["confusion_matrix"]})
            save_model(self.model_path, self.network.cpu(), info)
            self.network.to(self.device)
            with atomic_path(self.out / "summary.json") as tmp:
                Path(tmp).write_text(json.dumps(summary, indent=2))
            from .plots import plot_confusion, plot_learning_curves
            plot_learning_curves(self.history, self.out / "learning_curves.png")
            plot_confusion(metrics, self.out / "confusion.png")
        return summary
