#!/usr/bin/env python3
"""Mutation check of the protocol-critical modules: does the test suite notice a bug?

Each mutant below is one plausible bug, a source replacement (one line, or one line
in its context where the line alone is not unique) in network.py, cropping.py,
geometry.py, training/loss.py, training/trainer.py, training/dataset.py,
training/augment.py, modelfile.py or atomicfile.py, with the fastest test selection
that should notice it. For each mutant the script copies the working tree (tracked
files and untracked files git does not ignore) to a scratch folder, applies the
mutant there (never in the working tree), runs its selection with pytest and reports
it *killed* (a test failed) or *survived* (every test passed). Mutants that change
nothing a caller can observe are listed with the reason (``equivalent``): they must
survive, and the check fails if one does not. The result is recorded in
docs/testing.md.

    .venv/bin/python scripts/mutation_check.py            # every mutant (~15 min on 2 cores)
    .venv/bin/python scripts/mutation_check.py --list     # the mutants and their tests
    .venv/bin/python scripts/mutation_check.py --only loss-entropy-mean trainer-alpha-swapped

First the selections run once on the unmutated copy: a failing baseline would make
every mutant look killed, so it stops the check. Tests that need the real CT find it
through ILDSEG_TEST_DATA (default: ../shared/data beside the checkout). Exit status:
0 when every non-equivalent mutant is killed and every equivalent one survives, 1
otherwise, 2 when the baseline fails. Not part of ``make test``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
LIB = "ILDSegmentationLib"
T = "Testing/Python"


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to the repository
    old: str  # must occur exactly once in the file
    new: str
    tests: Tuple[str, ...]  # pytest node ids, relative to the repository
    equivalent: Optional[str] = None  # why no test can notice it

    def apply(self, root: Path) -> None:
        p = root / self.path
        text = p.read_text()
        n = text.count(self.old)
        if n != 1:
            raise SystemExit(f"mutant {self.name}: the text to replace occurs {n} times in {self.path} "
                             "(the source changed: update the mutant)")
        p.write_text(text.replace(self.old, self.new))


def m(name, path, old, new, *tests, equivalent=None) -> Mutant:
    return Mutant(name, path, old, new, tuple(tests), equivalent)


NET, CROP, GEO = f"{LIB}/engine/network.py", f"{LIB}/engine/cropping.py", f"{LIB}/imaging/geometry.py"
SIDES = f"{LIB}/imaging/lungsides.py"
LOSS, TRAIN, DATA = f"{LIB}/training/loss.py", f"{LIB}/training/trainer.py", f"{LIB}/training/dataset.py"
AUG, MODEL, ATOMIC = f"{LIB}/training/augment.py", f"{LIB}/engine/modelfile.py", f"{LIB}/imaging/atomicfile.py"
P = f"{T}/test_protocol.py"
FAST_FORWARD = f"{T}/test_bench.py::test_fast_forward_equals_forward_for_every_configuration"

MUTANTS: List[Mutant] = [
    # -- network.py -------------------------------------------------------------------
    m("net-dilations", NET, "= (1, 1, 2, 3, 5, 8, 13, 21, 34, 55)", "= (1, 1, 2, 3, 5, 8, 13, 21, 34, 34)",
      f"{P}::test_network_constants_are_the_papers", f"{T}/test_network.py::test_proposed_layout_exactly"),
    m("net-dropout", NET, "    dropout: float = 0.5", "    dropout: float = 0.2",
      f"{P}::test_network_constants_are_the_papers"),
    m("net-block-norm-skip", NET, "            c = c + n if self.norm_skip else n", "            c = n", FAST_FORWARD),
    m("net-input-norm-skip", NET, "            t = x + n if self.config.norm_skip else n", "            t = n",
      FAST_FORWARD),
    m("net-relu", NET, "        return F.relu(c)", "        return c", FAST_FORWARD),
    m("net-norm-affine-weight", NET, "F.instance_norm(x, weight=self.weight, bias=self.bias, eps=EPS)",
      "F.instance_norm(x, bias=self.bias, eps=EPS)",
      f"{T}/test_bench.py::test_bundled_model_on_the_phantom_matches_the_reference"),
    m("net-masked-variance", NET, "var = (centred * centred).sum(dim=(2, 3), keepdim=True) / count",
      "var = (centred * centred).sum(dim=(2, 3), keepdim=True) / (count + 1)",
      f"{T}/test_network.py::test_padded_masked_batch_equals_each_crop_alone"),
    m("net-he-normal", NET, 'nn.init.kaiming_normal_(m.weight, nonlinearity="relu")', "nn.init.xavier_normal_(m.weight)",
      f"{P}::test_weights_start_he_normal_with_zero_biases"),
    m("net-zero-bias", NET, "nn.init.zeros_(m.bias)", "nn.init.normal_(m.bias, std=0.01)",
      f"{P}::test_weights_start_he_normal_with_zero_biases"),
    m("net-receptive-field", NET, "return 1 + (self.kernel_size - 1) * sum(self.dilations)",
      "return 1 + self.kernel_size * sum(self.dilations)", f"{T}/test_network.py::test_proposed_layout_exactly"),
    m("net-input-masking", NET, "            x = x * valid\n", "            x = x\n",
      f"{T}/test_network.py::test_padded_masked_batch_equals_each_crop_alone",
      equivalent="every caller pads crops with zeros (trainer._pad_batch, Inferer._predict), so x * valid == x"),
    # -- cropping.py, lungsides.py ------------------------------------------------------
    m("crop-margin-24", CROP, "CROP_MARGIN = 32", "CROP_MARGIN = 24",
      f"{T}/test_geometry_cropping.py::test_crop_boxes_add_the_margin_and_clip_to_the_image",
      f"{P}::test_crop_boxes_are_the_lung_box_plus_32_pixels"),
    m("crop-row-end-off-by-one", CROP, "min(int(rows[-1]) + 1 + margin, h)", "min(int(rows[-1]) + margin, h)",
      f"{T}/test_geometry_cropping.py::test_crop_boxes_add_the_margin_and_clip_to_the_image"),
    m("crop-clip-at-1", CROP, "max(int(cols[0]) - margin, 0)", "max(int(cols[0]) - margin, 1)",
      f"{T}/test_geometry_cropping.py::test_crop_boxes_add_the_margin_and_clip_to_the_image"),
    m("crop-one-lung-side", SIDES, "RIGHT_LUNG if centre < lung_full.shape[-1] / 2 else LEFT_LUNG",
      "LEFT_LUNG if centre < lung_full.shape[-1] / 2 else RIGHT_LUNG",
      f"{T}/test_geometry_cropping.py::test_a_mask_of_one_lung_is_never_cut_and_keeps_its_side"),
    m("crop-valley-share", SIDES, "_VALLEY_SHARE = 0.5", "_VALLEY_SHARE = 0.02",
      f"{T}/test_geometry_cropping.py::test_split_left_right_separate_and_touching_lungs"),
    m("crop-whole-component-share", SIDES, "_WHOLE_COMPONENT_SHARE = 0.9", "_WHOLE_COMPONENT_SHARE = 0.5",
      f"{T}/test_geometry_cropping.py"),
    m("crop-undecided-side", SIDES, "sides[undecided & right_half] = RIGHT_LUNG",
      "sides[undecided & right_half] = LEFT_LUNG",
      f"{T}/test_geometry_cropping.py::test_split_left_right_separate_and_touching_lungs"),
    # -- geometry.py --------------------------------------------------------------------
    m("geo-row-flip", GEO, "        d[1, index_of_phys[1]] < 0,", "        d[1, index_of_phys[1]] > 0,",
      f"{T}/test_geometry_cropping.py::test_canonical_rows_run_anterior_to_posterior_and_columns_right_to_left"),
    m("geo-slice-flip", GEO, "        d[2, index_of_phys[2]] > 0,", "        d[2, index_of_phys[2]] < 0,",
      f"{T}/test_geometry_cropping.py::test_canonical_rows_run_anterior_to_posterior_and_columns_right_to_left"),
    m("geo-axis-match", GEO, "best = max(itertools.permutations(range(3))", "best = min(itertools.permutations(range(3))",
      f"{T}/test_geometry_cropping.py::test_canonical_view_is_the_same_whatever_the_index_order"),
    m("geo-canonical-spacing", GEO, "geometry.spacing[2 - a]", "geometry.spacing[a]",
      f"{T}/test_training.py::test_crops_only_from_annotated_slices_with_inference_cropping"),
    m("geo-zero-spacing", GEO, "np.any(sp <= 0)", "np.any(sp < 0)",
      f"{T}/test_geometry_cropping.py::test_invalid_geometry_is_refused"),
    m("geo-2d-direction", GEO, "d = (d[0], d[1], 0.0, d[2], d[3], 0.0, 0.0, 0.0, 1.0)",
      "d = (d[0], d[2], 0.0, d[1], d[3], 0.0, 0.0, 0.0, 1.0)",
      f"{T}/test_geometry_cropping.py::test_a_2d_image_is_one_axial_slice_with_its_in_plane_direction"),
    # -- training/loss.py ---------------------------------------------------------------
    m("loss-entropy-mean", LOSS, "entropy[unlabeled[n]].sum()", "entropy[unlabeled[n]].mean()",
      f"{P}::test_entropy_term_is_summed_over_several_unlabelled_pixels",
      f"{P}::test_trainer_hands_the_loss_the_papers_weights_scale_and_pixels"),
    m("loss-weights-sqrt", LOSS, "w[present] = 1.0 / counts[present]", "w[present] = 1.0 / np.sqrt(counts[present])",
      f"{T}/test_training.py::test_class_weights_inverse_to_counts_and_average_one"),
    m("loss-weights-sum-one", LOSS, "w *= present.sum() / w.sum()", "w /= w.sum()",
      f"{T}/test_training.py::test_class_weights_inverse_to_counts_and_average_one"),
    m("loss-scale-swapped", LOSS, "return float(n_labeled) / float(n_unlabeled)",
      "return float(n_unlabeled) / float(n_labeled)", f"{T}/test_training.py::test_entropy_scaling_options"),
    m("loss-count-labelled-only", LOSS, "count = labeled[n].sum() + unlabeled[n].sum()", "count = labeled[n].sum()",
      f"{P}::test_entropy_term_is_summed_over_several_unlabelled_pixels"),
    m("loss-padding-counts", LOSS, "inside = lung if valid is None else lung & valid", "inside = lung",
      f"{P}::test_entropy_term_is_summed_over_several_unlabelled_pixels"),
    m("loss-outside-lung-entropy", LOSS, "unlabeled = inside & ~labeled", "unlabeled = ~labeled",
      f"{T}/test_training.py::test_pixels_outside_the_lung_take_no_part"),
    m("loss-class-0-unlabelled", LOSS, "labeled = (target >= 0) & inside", "labeled = (target > 0) & inside",
      f"{P}::test_entropy_term_is_summed_over_several_unlabelled_pixels"),
    m("loss-unweighted-nll", LOSS, ".squeeze(1) * weights.to(logp.device)[safe_target]", ".squeeze(1)",
      f"{P}::test_entropy_term_is_summed_over_several_unlabelled_pixels"),
    m("loss-batch-sum", LOSS, "return torch.stack(losses).mean()", "return torch.stack(losses).sum()",
      f"{P}::test_entropy_term_is_summed_over_several_unlabelled_pixels"),
    m("loss-skip-zero-weight", LOSS, "if unsupervised_weight > 0 and unlabeled[n].any():", "if unlabeled[n].any():",
      f"{P}::test_entropy_term_is_summed_over_several_unlabelled_pixels",
      f"{T}/test_training.py::test_pixels_outside_the_lung_take_no_part",
      equivalent="with w_u = 0 the term adds alpha * 0 * (a finite entropy: log_softmax is finite) = 0.0"),
    # -- training/trainer.py ------------------------------------------------------------
    m("trainer-alpha-swapped", TRAIN, "entropy_scale(labeled, unlabeled, config.entropy_scaling)",
      "entropy_scale(unlabeled, labeled, config.entropy_scaling)",
      f"{P}::test_trainer_hands_the_loss_the_papers_weights_scale_and_pixels"),
    m("trainer-unit-weights", TRAIN, "loss = ild_loss(logits, t, lung, self.weights,",
      "loss = ild_loss(logits, t, lung, torch.ones_like(self.weights),",
      f"{P}::test_trainer_hands_the_loss_the_papers_weights_scale_and_pixels"),
    m("trainer-unlabelled-outside-lung", TRAIN, "((c.target < 0) & c.lung).sum()", "(c.target < 0).sum()",
      f"{P}::test_trainer_hands_the_loss_the_papers_weights_scale_and_pixels"),
    m("trainer-absolute-improvement", TRAIN, "bacc >= self.best_bacc * (1 + cfg.min_rel_improvement)",
      "bacc >= self.best_bacc + cfg.min_rel_improvement",
      f"{P}::test_early_stopping_is_relative_half_percent_with_patience_and_keeps_the_best"),
    m("trainer-patience-plus-one", TRAIN, "if since_best >= cfg.patience:", "if since_best > cfg.patience:",
      f"{P}::test_early_stopping_is_relative_half_percent_with_patience_and_keeps_the_best"),
    m("trainer-keep-last", TRAIN, "self.network.load_state_dict(self.best_state)",
      "self.network.load_state_dict(self.network.state_dict())",
      f"{P}::test_early_stopping_is_relative_half_percent_with_patience_and_keeps_the_best"),
    m("trainer-four-transforms", TRAIN, "rng.integers(0, 8, len(self.train))", "rng.integers(0, 4, len(self.train))",
      f"{P}::test_every_crop_meets_all_eight_flips_and_rotations"),
    m("trainer-lung-untransformed", TRAIN, "dihedral(c.target, k), dihedral(c.lung, k))",
      "dihedral(c.target, k), dihedral(c.lung, 0 if k == 2 else k))",
      f"{P}::test_every_crop_meets_all_eight_flips_and_rotations",
      f"{P}::test_trainer_hands_the_loss_the_papers_weights_scale_and_pixels"),
    m("trainer-default-lr", TRAIN, "    lr: float = 1e-4", "    lr: float = 1e-3",
      f"{P}::test_training_defaults_are_the_papers"),
    m("trainer-default-patience", TRAIN, "    patience: int = 50", "    patience: int = 30",
      f"{P}::test_training_defaults_are_the_papers"),
    m("trainer-default-min-rel", TRAIN, "    min_rel_improvement: float = 0.005", "    min_rel_improvement: float = 0.05",
      f"{P}::test_training_defaults_are_the_papers"),
    m("trainer-default-w-u", TRAIN, "    unsupervised_weight: float = 0.1", "    unsupervised_weight: float = 0.2",
      f"{P}::test_training_defaults_are_the_papers"),
    m("trainer-adamw", TRAIN, "torch.optim.Adam(self.network.parameters(), lr=config.lr)",
      "torch.optim.AdamW(self.network.parameters(), lr=config.lr)",
      f"{P}::test_trainer_uses_adam_at_the_configured_rate"),
    m("trainer-purely-supervised", TRAIN, "            self.unsupervised_weight = 0.0",
      "            self.unsupervised_weight = self.unsupervised_weight",
      f"{P}::test_purely_supervised_and_unscaled_runs_hand_the_loss_their_settings"),
    m("trainer-validation-dropout", TRAIN, "    network.eval()\n", "    network.train()\n",
      f"{P}::test_validation_scores_annotated_lung_pixels_in_eval_mode"),
    m("trainer-validation-outside-lung", TRAIN, "cm += confusion_matrix(truth, np.where(c.lung, pred, 0))",
      "cm += confusion_matrix(truth, pred)", f"{P}::test_validation_scores_annotated_lung_pixels_in_eval_mode"),
    m("trainer-padding-mask-to-loss", TRAIN, "None if valid is None else valid[:, 0] > 0)", "None)",
      f"{P}::test_early_stopping_is_relative_half_percent_with_patience_and_keeps_the_best",
      equivalent="_pad_batch pads the lung mask with False, so lung & valid == lung: padding never reaches the loss"),
    # -- training/dataset.py -------------------------------------------------------------
    m("dataset-no-margin", DATA, "for b in crop_boxes(sides[z], int(z)):",
      "for b in crop_boxes(sides[z], int(z), margin=0):", f"{P}::test_training_crops_are_the_inference_crops"),
    m("dataset-target-outside-lung", DATA, "target = np.where(lung & (ann > 0),", "target = np.where(ann > 0,",
      f"{P}::test_training_crops_are_the_inference_crops"),
    m("dataset-class-off-by-one", DATA, "ann.astype(np.int64) - 1, -1)", "ann.astype(np.int64), -1)",
      f"{P}::test_training_crops_are_the_inference_crops"),
    m("dataset-counts-skip-class-0", DATA, "t = c.target[c.target >= 0]", "t = c.target[c.target > 0]",
      f"{P}::test_trainer_hands_the_loss_the_papers_weights_scale_and_pixels"),
    m("dataset-transpose-from-5", DATA, "a = array.T if k >= 4 else array", "a = array.T if k > 4 else array",
      f"{P}::test_dihedral_is_exactly_the_eight_symmetries_of_the_square"),
    m("dataset-half-turns", DATA, "np.rot90(a, k % 4)", "np.rot90(a, 2 * (k % 2))",
      f"{P}::test_dihedral_is_exactly_the_eight_symmetries_of_the_square"),
    m("dataset-spacing-axes", DATA, "canonical_spacing(geometry)[1:]", "canonical_spacing(geometry)[:2]",
      f"{T}/test_training.py::test_crops_only_from_annotated_slices_with_inference_cropping"),
    m("dataset-every-slice", DATA, "annotated = np.flatnonzero(ann_c.reshape(ann_c.shape[0], -1).any(axis=1))",
      "annotated = np.arange(ann_c.shape[0])",
      f"{T}/test_training.py::test_crops_only_from_annotated_slices_with_inference_cropping",
      equivalent="a crop is kept only when its lung holds an annotated voxel, which no unannotated slice has"),
    # -- training/augment.py --------------------------------------------------------------
    m("augment-two-kernels", AUG, "choice = int(rng.integers(0, 3))", "choice = int(rng.integers(0, 2))",
      f"{T}/test_training.py::test_scanner_variation_adds_the_drawn_noise_and_keeps_the_attenuation"),
    m("augment-sharpen-sign", AUG, "x = x + np.float32(params[\"amount\"])", "x = x - np.float32(params[\"amount\"])",
      f"{T}/test_training.py::test_scanner_variation_kernels_smooth_and_sharpen_and_stay_in_range"),
    m("augment-noise-units", AUG, "/ sd * intensity.scale)", "/ sd)",
      f"{T}/test_training.py::test_scanner_variation_adds_the_drawn_noise_and_keeps_the_attenuation"),
    m("augment-clip", AUG, "np.clip(x, lo, hi, out=x)", "np.clip(x, lo - 1, hi, out=x)",
      f"{T}/test_training.py::test_scanner_variation_kernels_smooth_and_sharpen_and_stay_in_range"),
    m("augment-blur-range", AUG, "BLUR_SIGMA_PX: Tuple[float, float] = (0.3, 0.8)",
      "BLUR_SIGMA_PX: Tuple[float, float] = (0.3, 2.0)",
      f"{T}/test_training.py::test_scanner_variation_draws_from_the_documented_ranges"),
    m("augment-noise-range", AUG, "NOISE_SD_HU: Tuple[float, float] = (0.0, 25.0)",
      "NOISE_SD_HU: Tuple[float, float] = (0.0, 50.0)",
      f"{T}/test_training.py::test_scanner_variation_draws_from_the_documented_ranges"),
    # -- modelfile.py -----------------------------------------------------------------------
    m("model-no-checksum", MODEL, "if recorded is not None and recorded != weights_checksum(state):", "if False:",
      f"{T}/test_modelfile.py::test_a_damaged_weight_is_caught_by_the_checksum"),
    m("model-finite-any", MODEL, "if not torch.isfinite(v).all():", "if not torch.isfinite(v).any():",
      f"{T}/test_modelfile.py::test_a_single_nan_weight_is_refused"),
    m("model-train-mode", MODEL, "network.eval().to(device)", "network.train().to(device)",
      f"{T}/test_modelfile.py::test_round_trip_keeps_weights_and_metadata"),
    m("model-weights-not-loaded", MODEL, "network.load_state_dict({k: v.float() for k, v in state.items()})",
      "network.load_state_dict(network.state_dict())",
      f"{T}/test_modelfile.py::test_round_trip_keeps_weights_and_metadata"),
    m("model-header-length", MODEL, "if n > MAX_HEADER_BYTES or n > size - 8:", "if n > MAX_HEADER_BYTES:",
      f"{T}/test_modelfile.py::test_header_larger_than_file_is_refused"),
    m("model-version", MODEL, 'if d.get("format_version") != FORMAT_VERSION:', "if False:",
      f"{T}/test_modelfile.py::test_bad_metadata_gives_one_clear_error"),
    m("model-spacing-order", MODEL, "if not (0 < lo <= hi < 100):", "if not (0 < lo and hi < 100):",
      f"{T}/test_modelfile.py::test_bad_metadata_gives_one_clear_error"),
    m("model-spacing-not-written", MODEL, 'd["pixel_spacing_mm"] = list(self.pixel_spacing_mm)',
      'd["pixel_spacing"] = list(self.pixel_spacing_mm)',
      f"{T}/test_modelfile.py::test_pixel_spacing_range_round_trips_and_a_mismatched_description_is_refused"),
    m("model-config-unchecked", MODEL, "if info.network != network.config:", "if False:",
      f"{T}/test_modelfile.py::test_pixel_spacing_range_round_trips_and_a_mismatched_description_is_refused"),
    # -- atomicfile.py ------------------------------------------------------------------------
    m("atomic-mode-0600", ATOMIC, "os.chmod(tmp, 0o666 & ~umask)", "os.chmod(tmp, 0o600)",
      f"{T}/test_file_modes.py"),
    m("atomic-mode-0644", ATOMIC, "os.chmod(tmp, 0o666 & ~umask)", "os.chmod(tmp, 0o644)",
      f"{T}/test_file_modes.py"),
    m("atomic-keep-temporary", ATOMIC, "    except BaseException:\n        _remove(tmp)\n",
      "    except BaseException:\n        pass\n", f"{T}/test_file_modes.py"),
    m("atomic-no-access-check", ATOMIC, "if not os.access(folder, os.W_OK | os.X_OK):", "if False:",
      f"{T}/test_io.py::test_unwritable_output_leaves_nothing"),
    m("atomic-no-probe", ATOMIC,
      'raise InputError(f"output folder is not writable: {p.parent} ({e.strerror or e})") from None',
      "return p", f"{T}/test_reliability.py::test_unwritable_output_refused_before_any_work"),
    m("atomic-rename", ATOMIC, "os.replace(tmp, p)", "os.rename(tmp, p)", f"{T}/test_file_modes.py",
      equivalent="on POSIX os.rename replaces an existing target atomically, exactly as os.replace"),
]

PROTECTED = {NET, CROP, SIDES, GEO, LOSS, TRAIN, DATA, AUG, MODEL, ATOMIC}
assert {mu.path for mu in MUTANTS} == PROTECTED


def scratch_copy(dest: Path) -> None:
    """The working tree as git sees it: tracked and untracked-but-not-ignored files."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def environment(root: Path) -> dict:
    env = dict(os.environ)
    # The scratch copy's library first, also for the subprocesses tests start
    # (python -m ILDSegmentationLib); one thread each, so a busy machine stays usable.
    env["PYTHONPATH"] = str(root) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("ILDSEG_TEST_DATA", str(REPO.parent / "shared" / "data"))
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    return env


def run_tests(root: Path, tests: Sequence[str], timeout: float) -> Tuple[bool, str, float]:
    """(all passed, last lines of the output, seconds)."""
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-o", "addopts=", *tests]
    t = time.perf_counter()
    try:
        r = subprocess.run(cmd, cwd=root, env=environment(root), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout:.0f} s", time.perf_counter() - t
    lines = [line for line in (r.stdout + r.stderr).splitlines() if line.strip()]
    return r.returncode == 0, "\n".join(lines[-3:]), time.perf_counter() - t


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--list", action="store_true", help="list the mutants and their tests, run nothing")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run these mutants only")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per test run (default 600)")
    args = ap.parse_args(argv)
    mutants = MUTANTS
    if args.only:
        unknown = set(args.only) - {mu.name for mu in MUTANTS}
        if unknown:
            ap.error(f"unknown mutants: {', '.join(sorted(unknown))}")
        mutants = [mu for mu in MUTANTS if mu.name in args.only]
    if args.list:
        for mu in mutants:
            print(f"{mu.name:34} {mu.path:40} {' '.join(t.split('::')[-1] for t in mu.tests)}"
                  + (f"  [equivalent: {mu.equivalent}]" if mu.equivalent else ""))
        return 0

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ildseg-mutants-") as tmp:
        Path(tmp).chmod(0o755)  # tests that drop privileges run the copy as uid 65534
        root = Path(tmp) / "repo"
        scratch_copy(root)
        probe = subprocess.run([sys.executable, "-c", f"import {LIB}; print({LIB}.__file__)"], cwd=tmp,
                               env=environment(root), capture_output=True, text=True)
        if not probe.stdout.strip().startswith(str(root)):
            print(f"the scratch copy's library is not the one imported: {probe.stdout.strip()} {probe.stderr}")
            return 2
        originals = {p: (root / p).read_text() for p in PROTECTED}
        for mu in mutants:  # every mutant applies to the unmutated source
            mu.apply(root)
            (root / mu.path).write_text(originals[mu.path])
        selections = sorted({t for mu in mutants for t in mu.tests})
        ok, tail, seconds = run_tests(root, selections, args.timeout * 2)
        print(f"baseline: {len(selections)} selections on the unmutated copy: "
              f"{'pass' if ok else 'FAIL'} ({seconds:.0f} s)", flush=True)
        if not ok:
            print(tail)
            return 2
        rows = []
        for i, mu in enumerate(mutants, 1):
            mu.apply(root)
            try:
                passed, tail, seconds = run_tests(root, mu.tests, args.timeout)
            finally:
                (root / mu.path).write_text(originals[mu.path])
            status = "survived" if passed else "killed"
            good = passed if mu.equivalent else not passed
            verdict = status if good else ("UNEXPECTED KILL" if mu.equivalent else "SURVIVED")
            rows.append((mu, status, good))
            print(f"[{i:2}/{len(mutants)}] {mu.name:34} {verdict:16} {seconds:5.0f} s"
                  + (f"  (equivalent: {mu.equivalent})" if mu.equivalent and good else ""), flush=True)
            if not good:
                print("    " + tail.replace("\n", "\n    "))
    killed = sum(1 for _, s, _ in rows if s == "killed")
    equivalent = sum(1 for mu, s, g in rows if mu.equivalent and g)
    bad = [mu.name for mu, _, g in rows if not g]
    print(f"\n{len(rows)} mutants: {killed} killed, {equivalent} equivalent (survive as they must), "
          f"{len(bad)} unexplained{': ' + ', '.join(bad) if bad else ''}; "
          f"{(time.perf_counter() - started) / 60:.1f} min")
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
