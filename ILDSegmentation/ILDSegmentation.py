"""ILD Segmentation: interstitial lung disease pattern segmentation of chest CT in 3D Slicer.

Module, Widget, Logic and Test classes in Slicer's scripted-module conventions. The
widget only wires the panel to the logic; the logic is GUI-free and delegates every
MRML operation to ``ILDSegmentationLib.slicer.mrml`` (tested outside Slicer against the
real MRML core), so it can also be used from Slicer's Python console or a script::

    logic = slicer.util.getModuleLogic("ILDSegmentation")
    result = logic.process(ctNode, lungMaskNode=None, outputSegmentationNode=None, device="Auto")
    result.segmentation_node, result.table_node

Not for clinical use.
"""
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import sys
import time
import traceback
from typing import Annotated, Callable, List, Optional, Tuple, Union

import vtk

import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer import vtkMRMLLabelMapVolumeNode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode


# ---------------------------------------------------------------------------------
# Finding ILDSegmentationLib. Installed, the package sits next to this script (the
# extension's CMakeLists installs it there), and Slicer puts this folder on
# sys.path. In a source checkout the package is at the repository root, one level
# up; only the package itself is registered then (the root is not put on sys.path,
# which would make the checkout's Testing, scripts, docs and bench importable in
# Slicer).
# ---------------------------------------------------------------------------------
def _libraryFolder() -> Optional[str]:
    moduleFolder = os.path.dirname(os.path.abspath(__file__))
    for folder in (moduleFolder, os.path.dirname(moduleFolder)):
        if os.path.isfile(os.path.join(folder, "ILDSegmentationLib", "__init__.py")):
            return folder
    return None


def _registerLibrary(folder: str) -> None:
    """Make the package in ``folder`` importable as ILDSegmentationLib (its
    submodules included) without adding ``folder`` to sys.path. Loads only the
    package's light __init__ (a version string)."""
    if "ILDSegmentationLib" in sys.modules:
        return
    packageFolder = os.path.join(folder, "ILDSegmentationLib")
    spec = importlib.util.spec_from_file_location(
        "ILDSegmentationLib", os.path.join(packageFolder, "__init__.py"), submodule_search_locations=[packageFolder])
    module = importlib.util.module_from_spec(spec)
    sys.modules["ILDSegmentationLib"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["ILDSegmentationLib"]
        raise


_LIBRARY_FOLDER = _libraryFolder()
if _LIBRARY_FOLDER is not None and _LIBRARY_FOLDER not in sys.path:
    _registerLibrary(_LIBRARY_FOLDER)

#: Resources, relative to this script's folder (the same in both layouts).
UI_FILE = os.path.join("Resources", "UI", "ILDSegmentation.ui")
ICON_FILE = os.path.join("Resources", "Icons", "ILDSegmentation.png")
TERMINOLOGY_FILE = os.path.join("Resources", "ILDSegmentation.term.json")

#: Import name -> pip requirement for what Slicer may lack. torch is installed by the
#: PyTorch extension instead (it picks the build matching the GPU driver).
PIP_REQUIREMENTS = {"safetensors": "safetensors>=0.4", "scipy": "scipy>=1.7", "SimpleITK": "SimpleITK>=2.2"}

#: The torch versions the library works with: the range pyproject.toml requires (a test
#: keeps the two equal). Passed to PyTorch Utils when it installs torch, and checked
#: against an installed torch without importing it.
TORCH_REQUIREMENT = ">=2.1"

DEVICE_CHOICES = ["Auto", "GPU", "CPU"]
#: ILDSegmentationLib.engine.cropping.CROP_BOX_CHOICES (not imported at module load): where
#: each lung's crop box is cut, the paper's ("mask") first.
CROP_BOX_CHOICES = ["mask", "aerated"]
#: The fine-tuning epochs the spin box offers (the .ui's minimum and maximum). Slicer's
#: spin box connector sets the widget's range from the parameter's WithinRange, and
#: without one to the whole int range, overriding the .ui.
FINETUNE_EPOCHS_RANGE = (1, 1000)
#: How probabilities become labels (ILDSegmentationLib.engine.decision): Auto = the
#: model file's rule for whole lungs, Paper = the paper's argmax, Prior = the model's
#: class-prior (logit adjustment) rule.
DECISION_CHOICES = ["Auto", "Paper", "Prior"]

#: Memory one batch of slices may use. In Slicer's own process (logic.process, for
#: scripts) small CPU batches keep the GUI responsive between batches; the panel's run
#: is a separate process, which uses the command line's default for both.
GPU_BATCH_MEMORY_MB = 1024
CPU_BATCH_MEMORY_MB = 128
BACKGROUND_BATCH_MEMORY_MB = 1024

#: The self-test's limits: how long the run in a separate process may take (it
#: segments a 64 x 64 x 6 synthetic CT on the CPU, seconds when Slicer is idle), and
#: the share of lung voxels whose label may differ from the in-process run.
SELF_TEST_RUN_TIMEOUT_S = 600
SELF_TEST_MAX_DISAGREEMENT = 0.005

#: How often the panel looks at a run in a separate process (ms).
POLL_INTERVAL_MS = 200
#: ILDSegmentationLib.commands.progress.PROGRESS_PREFIX (not imported at module load).
PROGRESS_LINE_PREFIX = "ildseg-progress "

#: The library's messages name command-line options (they are shared with ildseg);
#: in the panel they name the panel's controls instead.
PANEL_WORDING = (
    ("; run with --device cpu", "; choose CPU as the Device (Model and device section)"),
    ("run with --device cpu", "choose CPU as the Device (Model and device section)"),
    ("--device cpu", "Device: CPU"),
    ("(see README, 'GPU users')", "(use the PyTorch Utils module to install a CUDA build)"),
    (" (--max-memory)", ""),
    ("(--pixel-spacing native)", "('Run at the model's pixel size' unchecked)"),
    ("--pixel-spacing native", "'Run at the model's pixel size' unchecked"),
    ("--pixel-spacing model", "'Run at the model's pixel size' checked"),
    ("(rerun with --debug for details)", "(details in the Python console)"),
    ("--lung-mask", "the Lung mask"),
    ("--model", "the Model file"),
    ("--probabilities", "'Also create per-class probability maps'"),
    ("(--force compares anyway)", "(check 'Compare even if the lungs do not match' to compare anyway)"),
)


def forPanel(message: str) -> str:
    """A library or command-line message reworded for the panel (its controls, not
    ildseg's options)."""
    text = str(message)
    for cli, panel in PANEL_WORDING:
        text = text.replace(cli, panel)
    return text


def versionTuple(version: str) -> Tuple[int, ...]:
    """(2, 13, 0) for "2.13.0+cu121": the leading numeric release parts."""
    parts = []
    for part in str(version).split("+")[0].split("."):
        digits = ""
        for ch in part:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        parts.append(int(digits))
        if len(digits) != len(part):  # "0rc1": the release ends here
            break
    return tuple(parts)


def installedTorchVersion() -> Optional[str]:
    """The installed torch's version from its package metadata: torch is not imported
    (on Windows a loaded torch cannot be replaced by PyTorch Utils)."""
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None


def torchVersionProblem(version: Optional[str]) -> Optional[str]:
    """A message when ``version`` is older than TORCH_REQUIREMENT; None when it fits
    (or no torch is installed: that is offered separately)."""
    if version is None:
        return None
    minimum = versionTuple(TORCH_REQUIREMENT.lstrip(">="))
    if versionTuple(version) >= minimum:
        return None
    return _("PyTorch {version} is installed, but ILD Segmentation needs PyTorch {requirement}. Open the PyTorch "
             "Utils module, uninstall PyTorch, restart Slicer, then install it with the version requirement "
             "'{requirement}'.").format(version=version, requirement=TORCH_REQUIREMENT)


def torchImportProblem() -> Optional[str]:
    """Import torch (the first call loads it: only when the user runs, never when the
    panel opens). None when it works, else a message for the user. An installed but
    broken torch is found by importlib yet fails to import: ImportError, or OSError
    when a DLL does not load (Windows), or anything else its initialization raises."""
    try:
        import torch  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any failure here is a broken install
        error = str(e).splitlines()[0] if str(e) else type(e).__name__
        return _("PyTorch is installed but cannot be loaded ({error}). Reinstall it: open the PyTorch Utils "
                 "module, uninstall PyTorch, restart Slicer, then install it again.").format(error=error)
    return None


def forgetOtherInputsNodes(parameterNode) -> bool:
    """After the input CT changed: unselect the output segmentation and the annotation
    segmentation when they hold another CT's results or examples (the nodes stay in
    the scene as they are). Both are decided before either is written: writing the
    parameter node runs the panel's handler again (nested), with the new CT already
    seen, so a check left for after the first write would never run. Returns True
    when something was unselected."""
    from ILDSegmentationLib.slicer import mrml
    from ILDSegmentationLib.slicer.trainingset import annotation_fits_input

    p = parameterNode
    otherOutput = not mrml.output_fits_input(p.outputSegmentation, p.inputVolume)
    otherAnnotation = not annotation_fits_input(p.annotationSegmentation, p.inputVolume)
    if otherOutput:
        p.outputSegmentation = None
    if otherAnnotation:
        p.annotationSegmentation = None  # never added to the training set with this CT
    return otherOutput or otherAnnotation


def findPythonSlicer(slicerHome: Optional[str], executable: str) -> Optional[str]:
    """Slicer's Python launcher PythonSlicer (PythonSlicer.exe on Windows): in the
    "bin" folder of ``slicerHome`` (slicer.app.slicerHome: the install folder; on macOS
    Slicer.app/Contents, whose bin holds it too), else beside ``executable`` (inside
    Slicer, sys.executable is SlicerApp-real in that bin folder). None when absent."""
    name = "PythonSlicer.exe" if os.name == "nt" else "PythonSlicer"
    folders = [os.path.join(slicerHome, "bin")] if slicerHome else []
    folders.append(os.path.dirname(os.path.abspath(executable)))
    for folder in folders:
        candidate = os.path.join(folder, name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def _errorHtml(text: str) -> str:
    return "<span style='color:red'>" + text.replace("&", "&amp;").replace("<", "&lt;") + "</span>"


#: "Not seen yet" for the widget's memory of parameter node values (None is a value).
_NOT_SEEN = object()


def _resourcePath(relativePath: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), relativePath)


#
# ILDSegmentation
#
class ILDSegmentation(ScriptedLoadableModule):
    """Module description shown in Slicer."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("ILD Segmentation")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        # PyTorch is declared as an extension dependency (installed with this extension
        # from the Extensions Manager) but not as a module dependency, so the panel
        # still opens and can offer to install it when it is missing.
        self.parent.dependencies = []
        self.parent.contributors = ["ILDSegmentation contributors"]
        self.parent.helpText = _(
            "Segments interstitial lung disease (ILD) patterns in chest CT into six classes: healthy tissue, "
            "ground glass opacity, micronodules, consolidation, reticulation and honeycombing, with a table of "
            "their volumes. <b>Research use only: not for clinical use.</b> The bundled model's provenance is "
            "shown in the panel: it was trained on simulated patterns only (see its model card)."
            "<br>Method: M. Anthimopoulos, S. Christodoulidis, L. Ebner, T. Geiser, A. Christe, "
            "S. Mougiakakou, \"Semantic Segmentation of Pathological Lung Tissue with Dilated Fully "
            "Convolutional Networks\", IEEE Journal of Biomedical and Health Informatics, 2018 "
            "(doi:10.1109/JBHI.2018.2818620, arXiv:1803.06167). This is an independent reimplementation."
        )
        self.parent.acknowledgementText = _(
            "Network, training and inference follow Anthimopoulos et al., IEEE JBHI 2018. "
            "Built on 3D Slicer, PyTorch and the SlicerPyTorch extension."
        )
        # Terminology must be registered before segmentations using it are shown.
        slicer.app.connect("startupCompleted()", loadTerminology)


def loadTerminology() -> Optional[str]:
    """Register the six classes' terminology with Slicer's Terminologies module, so
    the segments show their category, type and codes and keep them on export."""
    if not hasattr(slicer.modules, "terminologies"):
        return None
    terminologiesLogic = slicer.modules.terminologies.logic()
    path = _resourcePath(TERMINOLOGY_FILE)
    try:
        from ILDSegmentationLib.terminology import TERMINOLOGY_CONTEXT
        if terminologiesLogic.IsTerminologyContextLoaded(TERMINOLOGY_CONTEXT):
            return TERMINOLOGY_CONTEXT
    except (ImportError, AttributeError):
        pass
    name = terminologiesLogic.LoadTerminologyFromFile(path)
    if not name:
        logging.warning(f"ILD Segmentation: could not load the terminology file {path}")
    return name or None


#
# Parameter node
#
@parameterNodeWrapper
class ILDSegmentationParameterNode:
    """The panel's state, saved with the scene.

    inputVolume: the chest CT. lungMask: a label map or a segmentation; None means
    "compute automatically". lungSegmentIDs: the lung segments when lungMask is a
    segmentation (derived from lungMask when it changes). useBundledModel /
    modelPath: the model ("" or "." means none chosen). device: Auto, GPU or CPU.
    outputSegmentation: None creates a new segmentation; it is reset to None when the
    input CT changes and it holds another CT's results. probabilities: also create
    per-class probability maps. atModelPixelSpacing: run the network at a pixel size
    within the model's training range (a CT outside it is resampled in-plane and the
    labels brought back); off runs at the CT's own pixel size, as the paper did.
    decision: the decision rule, one of DECISION_CHOICES.
    annotationSegmentation: painted examples of the input CT (six class segments).
    trainingFolder: the local training set (manifest.csv and one folder per case).
    modelFolder: where fine-tuned models go. finetuneEpochs: at most this many epochs.
    cropBox: where each lung's crop box is cut (Advanced): "mask" as in the paper, or
    "aerated" (the aerated lung the mask outlines; ildseg segment --crop-box).
    compareBaselineVolume / compareFollowupVolume: the two CTs of "Compare with an
    earlier scan"; compareBaselineSegmentation / compareFollowupSegmentation: their
    earlier ILD segmentations to reuse (None: segmented by the comparison);
    compareForce: compare even when the lungs do not match after registration.

    Every number a spin box shows has a WithinRange equal to the .ui's range: Slicer's
    connector sets the widget's range from it (a test compares the two).
    """

    inputVolume: vtkMRMLScalarVolumeNode
    lungMask: Union[vtkMRMLLabelMapVolumeNode, vtkMRMLSegmentationNode, None]
    lungSegmentIDs: list[str]
    useBundledModel: bool = True
    # A str, wired by hand to the path box: a pathlib.Path parameter cannot be empty
    # (Path("") is ".", which the box would show and the scene save).
    modelPath: str = ""
    device: Annotated[str, Choice(DEVICE_CHOICES)] = "Auto"
    outputSegmentation: vtkMRMLSegmentationNode
    probabilities: bool = False
    atModelPixelSpacing: bool = True
    decision: Annotated[str, Choice(DECISION_CHOICES)] = "Auto"
    # Teaching it (issue 16). The folders are str, wired by hand to their path boxes
    # (as modelPath): "" means none chosen.
    annotationSegmentation: vtkMRMLSegmentationNode
    trainingFolder: str = ""
    modelFolder: str = ""
    finetuneEpochs: Annotated[int, WithinRange(*FINETUNE_EPOCHS_RANGE)] = 40
    cropBox: Annotated[str, Choice(CROP_BOX_CHOICES)] = "mask"
    # Compare with an earlier scan (issue 27).
    compareBaselineVolume: vtkMRMLScalarVolumeNode
    compareBaselineSegmentation: vtkMRMLSegmentationNode
    compareFollowupVolume: vtkMRMLScalarVolumeNode
    compareFollowupSegmentation: vtkMRMLSegmentationNode
    compareForce: bool = False


#
# Widget
#
class ILDSegmentationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: wiring only; the work is done by ILDSegmentationLogic."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        # The tag of the GUI connection the parameter node holds, None when there is
        # none: connectParametersToGui returns it on every Slicer version (connectGui
        # returns None on 5.8, so disconnectGui did nothing and connections piled up).
        self._parameterNodeGuiTag = None
        #: Parameter name -> widget: the .ui's widgets with a SlicerParameterName (found
        #: once, as connectGui finds them on every call).
        self._parameterWidgets = {}
        self._running = False
        self._cancelRequested = False
        self._startTime = 0.0
        self._lastResult = None
        # The run in a separate process (ILDSegmentationLib.slicer.background.SegmentationJob),
        # polled by a timer on the GUI thread; its results are dropped when the scene
        # closes meanwhile.
        self._job = None
        self._discardJobResult = False
        self._pollTimer = None
        # Fine-tuning in a separate process (ILDSegmentationLib.slicer.background.FinetuneJob).
        self._finetuneJob = None
        self._finetuneTimer = None
        # "Compare with an earlier scan" in a separate process (ILDSegmentationLib.slicer.compare.CompareJob).
        self._compareJob = None
        self._discardCompareResult = False
        self._compareTimer = None
        # What the parameter node held when last seen, to act when the user changes it.
        self._seenLungMask = _NOT_SEEN
        self._seenInputVolume = _NOT_SEEN

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/ILDSegmentation.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        import qt

        self._parameterWidgets = {
            str(widget.property("SlicerParameterName")): widget for widget in uiWidget.findChildren(qt.QWidget)
            if widget.property("SlicerParameterName")}

        self.logic = ILDSegmentationLogic()
        self.ui.progressBar.setVisible(False)
        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(POLL_INTERVAL_MS)
        self._pollTimer.connect("timeout()", self._onPollTimer)
        self._finetuneTimer = qt.QTimer()
        self._finetuneTimer.setInterval(4 * POLL_INTERVAL_MS)
        self._finetuneTimer.connect("timeout()", self._onFinetuneTimer)
        self.ui.finetuneProgressBar.setVisible(False)
        self._compareTimer = qt.QTimer()
        self._compareTimer.setInterval(POLL_INTERVAL_MS)
        self._compareTimer.connect("timeout()", self._onCompareTimer)
        self.ui.compareProgressBar.setVisible(False)
        self.ui.compareTableView.setVisible(False)
        self.ui.resultsCollapsibleButton.collapsed = True

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        # No slot on lungMaskSelector: connectGui writes the chosen mask into the
        # parameter node, and _onParameterNodeModified derives the lung segments from
        # it. (A slot here that wrote the parameter node ran before connectGui's own
        # slot, so the wrapper set the selector back to the old mask.)
        self.ui.lungSegmentSelector.connect("segmentSelectionChanged(QStringList)", self.onLungSegmentsChanged)
        self.ui.useBundledModelCheckBox.connect("toggled(bool)", self.updateModelInfo)
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.onModelPathChanged)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.updateDeviceInfo)
        self.ui.editSegmentationButton.connect("clicked(bool)", self.onEditSegmentation)
        self.ui.createAnnotationButton.connect("clicked(bool)", self.onCreateAnnotation)
        self.ui.addToTrainingSetButton.connect("clicked(bool)", self.onAddToTrainingSet)
        self.ui.trainingFolderLineEdit.connect("currentPathChanged(QString)", self.onTrainingFolderChanged)
        self.ui.modelFolderLineEdit.connect("currentPathChanged(QString)", self.onModelFolderChanged)
        self.ui.userModelComboBox.connect("activated(int)", self.onUserModelChosen)
        self.ui.finetuneButton.connect("clicked(bool)", self.onFinetuneButton)
        self.ui.compareButton.connect("clicked(bool)", self.onCompareButton)

        self.initializeParameterNode()
        self.updateModelInfo()
        self.updateDeviceInfo()

    def cleanup(self) -> None:
        self._cancelRequested = True
        if self._job is not None:  # the module is reloaded or Slicer quits: stop the run
            self._job.cancel()
            self._job.cleanup()
            self._job = None
        if self._pollTimer is not None:
            self._pollTimer.stop()
        if self._finetuneJob is not None:  # its run folder is removed with it
            self._finetuneJob.cancel()
            self._finetuneJob.cleanup()
            self._finetuneJob = None
        if self._finetuneTimer is not None:
            self._finetuneTimer.stop()
        if self._compareJob is not None:
            self._compareJob.cancel()
            self._compareJob.cleanup()
            self._compareJob = None
        if self._compareTimer is not None:
            self._compareTimer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._disconnectParameterNodeGui()
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        self._cancelRequested = True  # a running job must not write into a closing scene
        if self._job is not None:
            self._discardJobResult = True
            self._job.cancel()
        if self._compareJob is not None:
            self._discardCompareResult = True
            self._compareJob.cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode and not firstVolumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.inputVolume = firstVolumeNode

    def _connectParameterNodeGui(self) -> None:
        """Bind the panel's widgets to the parameter node; the tag is kept for the one
        disconnect. (Slicer 5.8 and 5.10 also leave a ModifiedEvent observer of the
        parameterNodeWrapper on the node per connection; after the disconnect it finds
        no widgets of its wrapper, a no-op; Slicer main removes it.)"""
        self._disconnectParameterNodeGui()
        self._parameterNodeGuiTag = self._parameterNode.connectParametersToGui(self._parameterWidgets)

    def _disconnectParameterNodeGui(self) -> None:
        if self._parameterNode is not None and self._parameterNodeGuiTag is not None:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
        self._parameterNodeGuiTag = None

    def setParameterNode(self, inputParameterNode: Optional[ILDSegmentationParameterNode]) -> None:
        if self._parameterNode:
            self._disconnectParameterNodeGui()
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        # A node just set (a loaded scene, a new one) keeps its choices: only later
        # changes of the CT reset the output. Its lung segments are still checked.
        self._seenLungMask = _NOT_SEEN
        self._seenInputVolume = inputParameterNode.inputVolume if inputParameterNode else _NOT_SEEN
        if self._parameterNode:
            self._connectParameterNodeGui()
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self._onParameterNodeModified()

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        """Things connectGui does not cover: what follows from a newly chosen lung mask
        or CT, the lung segment list, the model path box, enabled states."""
        p = self._parameterNode
        if p is None:
            return
        from ILDSegmentationLib.slicer import mrml

        # Writing the parameter node here runs this again (nested), with the node
        # already holding the new choice, so the widgets show it.
        if p.lungMask is not self._seenLungMask:
            self._seenLungMask = p.lungMask
            ids = mrml.lung_segment_ids_for(p.lungMask, list(p.lungSegmentIDs))
            if ids is not None and ids != list(p.lungSegmentIDs):
                p.lungSegmentIDs = ids
                return
        if p.inputVolume is not self._seenInputVolume:
            self._seenInputVolume = p.inputVolume
            if forgetOtherInputsNodes(p):
                return
        maskIsSegmentation = p.lungMask is not None and p.lungMask.IsA("vtkMRMLSegmentationNode")
        self.ui.lungSegmentsLabel.setVisible(maskIsSegmentation)
        self.ui.lungSegmentSelector.setVisible(maskIsSegmentation)
        if maskIsSegmentation:
            wasBlocked = self.ui.lungSegmentSelector.blockSignals(True)
            if self.ui.lungSegmentSelector.currentNode() is not p.lungMask:
                self.ui.lungSegmentSelector.setCurrentNode(p.lungMask)
            if list(self.ui.lungSegmentSelector.selectedSegmentIDs()) != list(p.lungSegmentIDs):
                self.ui.lungSegmentSelector.setSelectedSegmentIDs(list(p.lungSegmentIDs))
            self.ui.lungSegmentSelector.blockSignals(wasBlocked)
        shownPath = "" if p.modelPath.strip() in ("", ".") else p.modelPath
        if self.ui.modelPathLineEdit.currentPath != shownPath:
            wasBlocked = self.ui.modelPathLineEdit.blockSignals(True)
            self.ui.modelPathLineEdit.currentPath = shownPath
            self.ui.modelPathLineEdit.blockSignals(wasBlocked)
            self.updateModelInfo()
        self.ui.modelPathLineEdit.enabled = not p.useBundledModel and not self._running
        for box, value, refresh in ((self.ui.trainingFolderLineEdit, p.trainingFolder, self.updateTrainingSetInfo),
                                    (self.ui.modelFolderLineEdit, p.modelFolder, self.updateUserModels)):
            if box.currentPath != value:
                wasBlocked = box.blockSignals(True)
                box.currentPath = value
                box.blockSignals(wasBlocked)
                refresh()
        self._updateApplyButton()

    def _updateApplyButton(self) -> None:
        """The Apply/Cancel button, and the edit button: enabled only when the output
        segmentation holds segments (not after a cancelled or failed first run)."""
        from ILDSegmentationLib.slicer import mrml

        p = self._parameterNode
        self.ui.editSegmentationButton.enabled = (
            not self._running and p is not None and mrml.has_segments(p.outputSegmentation))
        self._updateTeachButtons()
        self._updateCompareButton()
        if (self._finetuneJob is not None or self._compareJob is not None) and not self._running:
            self.ui.applyButton.text = _("Segment ILD")
            self.ui.applyButton.toolTip = (_("Fine-tuning is running (see below)") if self._finetuneJob is not None
                                           else _("A comparison is running (see below)"))
            self.ui.applyButton.enabled = False
            return
        if self._running:
            self.ui.applyButton.text = _("Cancelling...") if self._cancelRequested else _("Cancel")
            self.ui.applyButton.toolTip = _("Stop; the scene is left as it was")
            self.ui.applyButton.enabled = not self._cancelRequested
            return
        self.ui.applyButton.text = _("Segment ILD")
        if p is None or p.inputVolume is None:
            self.ui.applyButton.toolTip = _("Select an input CT")
            self.ui.applyButton.enabled = False
        else:
            self.ui.applyButton.toolTip = _("Segment the ILD patterns of the input CT")
            self.ui.applyButton.enabled = True

    def onModelPathChanged(self, path) -> None:
        if self._parameterNode is not None:
            self._parameterNode.modelPath = str(path or "")
        self.updateModelInfo()

    def onLungSegmentsChanged(self, segmentIDs) -> None:
        if self._parameterNode is not None:
            self._parameterNode.lungSegmentIDs = [str(s) for s in segmentIDs]

    def updateModelInfo(self, *args) -> None:
        # Read the widgets, not the parameter node: this slot may run before
        # connectGui's own slot has copied the new value into the parameter node.
        useBundled = self.ui.useBundledModelCheckBox.checked
        self.ui.modelPathLineEdit.enabled = not useBundled and not self._running
        try:  # runs in setup(): whatever fails, the panel still opens, with the reason
            modelPath = self.logic.resolveModelPath(useBundled, self.ui.modelPathLineEdit.currentPath)
            self.ui.modelInfoLabel.text = self.logic.describeModel(modelPath)
        except Exception as e:
            logging.error(traceback.format_exc())
            self.ui.modelInfoLabel.text = _errorHtml(_("Cannot show the model's details: {error}").format(error=e))

    def updateDeviceInfo(self, *args) -> None:
        choice = self.ui.deviceComboBox.currentText or "Auto"
        try:  # runs in setup(): whatever fails, the panel still opens, with the reason
            self.ui.deviceInfoLabel.text = self.logic.describeDevice(choice)
        except Exception as e:
            logging.error(traceback.format_exc())
            self.ui.deviceInfoLabel.text = _errorHtml(_("Cannot check the device: {error}").format(error=e))

    def _ensureDependencies(self) -> bool:
        """First use: offer to install what is missing, after asking once. Never at
        import. An installed torch older than the library needs is refused with the way
        to replace it (checked from its metadata: torch is not imported here)."""
        missingTorch = not self.logic.torchAvailable()
        missingPip = self.logic.missingPipPackages()
        problem = None if missingTorch else torchVersionProblem(installedTorchVersion())
        if problem:
            self.ui.statusLabel.text = problem
            slicer.util.errorDisplay(problem, windowTitle=_("PyTorch too old"))
            return False
        if not missingTorch and not missingPip:
            return True
        if missingTorch:
            if not slicer.util.confirmOkCancelDisplay(_(
                    "ILD Segmentation needs PyTorch {requirement}, which is not installed yet.\n\n"
                    "Install it now through the PyTorch extension? It picks the build that matches your "
                    "GPU driver (or a CPU build). This downloads several hundred MB and may take minutes."
                    ).format(requirement=TORCH_REQUIREMENT), windowTitle=_("Install PyTorch")):
                return False
            # Asked once, here: no dialog may come up under the busy cursor of the installation.
            try:
                with slicer.util.tryWithErrorDisplay(_("Installing PyTorch failed."), waitCursor=True):
                    self.logic.installTorch()
            except Exception:  # already shown to the user by tryWithErrorDisplay
                return False
        if missingPip:
            requirements = [PIP_REQUIREMENTS[name] for name in missingPip]
            if not slicer.util.confirmOkCancelDisplay(
                    _("ILD Segmentation needs these Python packages: {packages}.\n\nInstall them now with "
                      "pip (internet access needed)?").format(packages=", ".join(requirements)),
                    windowTitle=_("Install Python packages")):
                return False
            try:
                with slicer.util.tryWithErrorDisplay(_("Installing Python packages failed."), waitCursor=True):
                    slicer.util.pip_install(requirements)
            except Exception:  # already shown to the user by tryWithErrorDisplay
                return False
        importlib.invalidate_caches()
        if not self.logic.torchAvailable() or self.logic.missingPipPackages():
            if slicer.util.confirmOkCancelDisplay(_(
                    "The packages were installed but cannot be used in this session. Slicer must be restarted. "
                    "Restart now?"), windowTitle=_("Restart needed")):
                slicer.util.restart()
            return False
        self.updateDeviceInfo()
        self.updateModelInfo()
        return True

    def _setRunning(self, running: bool) -> None:
        self._running = running
        for widget in (self.ui.inputsCollapsibleButton, self.ui.modelCollapsibleButton,
                       self.ui.outputsCollapsibleButton, self.ui.advancedCollapsibleButton):
            widget.enabled = not running
        self.ui.progressBar.setVisible(running)
        if running:
            self._cancelRequested = False
            self._startTime = time.time()
            self.ui.progressBar.value = 0
        self._updateApplyButton()

    def onApplyButton(self) -> None:
        if self._running:
            self._cancelRequested = True
            self.ui.statusLabel.text = _("Cancelling...")
            if self._job is not None:
                self._job.cancel()
            self._updateApplyButton()
            return
        if not self._ensureDependencies():
            return
        self._startJob()

    def _startJob(self) -> None:
        """Start the run in a separate process: Slicer stays responsive (torch is
        imported and the model loaded there, not here) and Cancel ends it at once.
        Only writing the inputs to a temporary folder happens here, under a busy cursor."""
        from ILDSegmentationLib.errors import ILDSegError

        p = self._parameterNode
        maskIsSegmentation = p.lungMask is not None and p.lungMask.IsA("vtkMRMLSegmentationNode")
        try:
            with slicer.util.WaitCursor():
                job = self.logic.startProcess(
                    p.inputVolume, p.lungMask, p.outputSegmentation,
                    lungSegmentIDs=list(p.lungSegmentIDs) if maskIsSegmentation else None,
                    modelPath=self.logic.resolveModelPath(p.useBundledModel, p.modelPath),
                    device=p.device, probabilities=p.probabilities,
                    pixelSpacing="model" if p.atModelPixelSpacing else "native", cropBox=p.cropBox,
                    decision=p.decision)
        except ILDSegError as e:
            self.ui.statusLabel.text = forPanel(str(e))
            slicer.util.errorDisplay(forPanel(str(e)))
            return
        except Exception as e:
            logging.error(traceback.format_exc())
            self.ui.statusLabel.text = _("Failed: {error}").format(error=str(e).splitlines()[0] if str(e) else type(e).__name__)
            slicer.util.errorDisplay(_("Unexpected error: {error}").format(error=e), detailedText=traceback.format_exc())
            return
        self._job = job
        self._discardJobResult = False
        self._setRunning(True)
        self.ui.statusLabel.text = job.message
        self._pollTimer.start()

    @staticmethod
    def _pollJob(job, progressBar, logPrefix: str) -> str:
        """A background job's state; its own messages go to the Python console (not its
        progress lines: they move the progress bar)."""
        state = job.poll()
        for line in job.new_lines:
            if not line.startswith(PROGRESS_LINE_PREFIX):
                logging.info(f"{logPrefix}: {line}")
        progressBar.value = int(round(100 * job.fraction))
        return state

    def _onPollTimer(self) -> None:
        """A few times a second: the run's progress; at its end, its results. Never
        blocks (the run's output is read by a thread that only fills a queue)."""
        from ILDSegmentationLib.slicer.background import CANCELLED, FINISHED_STATES, SUCCEEDED
        from ILDSegmentationLib.errors import ILDSegError

        job = self._job
        if job is None:
            self._pollTimer.stop()
            return
        state = self._pollJob(job, self.ui.progressBar, "ILD Segmentation")
        if state not in FINISHED_STATES:
            if not self._cancelRequested:
                self.ui.statusLabel.text = f"{job.message}  ({job.elapsed_s:.0f} s)"
            return
        self._pollTimer.stop()
        self._job = None
        result = None
        if self._discardJobResult:  # the scene closed during the run
            job.cleanup()
            self.ui.statusLabel.text = _("Stopped: the scene was closed.")
        elif state == SUCCEEDED:
            try:
                result = self.logic.finishProcess(job)
            except ILDSegError as e:
                self.ui.statusLabel.text = forPanel(str(e))
                slicer.util.errorDisplay(forPanel(str(e)))
            except Exception as e:
                logging.error(traceback.format_exc())
                self.ui.statusLabel.text = _("Failed: {error}").format(error=e)
                slicer.util.errorDisplay(_("Unexpected error: {error}").format(error=e),
                                         detailedText=traceback.format_exc())
        elif state == CANCELLED:
            self.ui.statusLabel.text = _("Cancelled. Nothing was changed.")
        else:
            message = forPanel(job.error or _("the run failed"))
            if "torch" in message.lower():
                message += " " + _("If PyTorch is broken, reinstall it: open the PyTorch Utils module, uninstall "
                                   "PyTorch, restart Slicer, then install it again.")
            self.ui.statusLabel.text = message
            slicer.util.errorDisplay(message, windowTitle=_("ILD segmentation failed"),
                                     detailedText="\n".join(job.child.lines))
        self._setRunning(False)
        if result is not None:
            self._showResult(result)

    def _showResult(self, result) -> None:
        p = self._parameterNode
        self._lastResult = result
        p.outputSegmentation = result.segmentation_node
        slicer.util.setSliceViewerLayers(background=p.inputVolume)
        self.ui.resultsTableView.setMRMLTableNode(result.table_node)
        # Issue 15: per region volumes, and what the CT tells about its acquisition.
        self.ui.regionsTableView.setMRMLTableNode(result.regions_table_node)
        self.ui.regionsLabel.setVisible(result.regions_table_node is not None)
        self.ui.regionsTableView.setVisible(result.regions_table_node is not None)
        self.ui.inputChecksLabel.text = self.describeInputChecks(result.warnings)
        self.ui.distributionLabel.text = "<br>".join(
            line.replace("&", "&amp;").replace("<", "&lt;") for line in result.distribution)
        self.ui.resultsCollapsibleButton.collapsed = False
        self._updateApplyButton()
        note = "" if result.model_trained else _(" WARNING: untrained model, the labels are meaningless.")
        if result.resampled:
            note = _(" Run at {row:.2f} x {column:.2f} mm pixels, the model's training range.").format(
                row=result.network_pixel_spacing_mm[0], column=result.network_pixel_spacing_mm[1]) + note
        if result.decision:
            note = _(" Decision rule: {rule}.").format(rule=result.decision) + note
        self.ui.statusLabel.text = _("Done in {seconds:.1f} s on {device}; lung {volume:.0f} mL.{note}").format(
            seconds=result.seconds, device=result.device, volume=result.volumes["lung_volume_ml"], note=note)
        self.ui.deviceInfoLabel.text = _("Last run on: {device}").format(device=result.device)

    # -- teaching it your site's disease (issue 16) ---------------------------------------
    def _updateTeachButtons(self) -> None:
        p = self._parameterNode
        busy = self._running or self._finetuneJob is not None or self._compareJob is not None
        haveCT = p is not None and p.inputVolume is not None
        self.ui.createAnnotationButton.enabled = haveCT and not busy
        self.ui.addToTrainingSetButton.enabled = (haveCT and not busy and p.annotationSegmentation is not None
                                                  and bool(p.trainingFolder.strip()))
        if self._finetuneJob is not None:
            self.ui.finetuneButton.text = _("Cancel fine-tuning")
            self.ui.finetuneButton.enabled = True
        else:
            self.ui.finetuneButton.text = _("Fine-tune")
            self.ui.finetuneButton.enabled = (not busy and p is not None and bool(p.trainingFolder.strip())
                                              and bool(p.modelFolder.strip()))
        for widget in (self.ui.trainingFolderLineEdit, self.ui.modelFolderLineEdit, self.ui.finetuneEpochsSpinBox,
                       self.ui.annotationSelector):
            widget.enabled = not busy

    def onCreateAnnotation(self) -> None:
        from ILDSegmentationLib.errors import ILDSegError

        p = self._parameterNode
        try:
            node = self.logic.createAnnotationSegmentation(p.inputVolume)
        except ILDSegError as e:
            slicer.util.errorDisplay(forPanel(str(e)))
            return
        p.annotationSegmentation = node
        self._openInSegmentEditor(node, p.inputVolume)

    def onTrainingFolderChanged(self, path) -> None:
        if self._parameterNode is not None:
            self._parameterNode.trainingFolder = str(path or "")
        self.updateTrainingSetInfo()

    def onModelFolderChanged(self, path) -> None:
        if self._parameterNode is not None:
            self._parameterNode.modelFolder = str(path or "")
        self.updateUserModels()

    def updateTrainingSetInfo(self) -> None:
        folder = self.ui.trainingFolderLineEdit.currentPath
        try:
            self.ui.trainingSetLabel.text = self.logic.trainingSetSummary(folder).message() if folder else ""
        except Exception as e:  # a manifest the training CLI cannot read, an unreadable case
            self.ui.trainingSetLabel.text = _errorHtml(forPanel(str(e)))

    def updateUserModels(self) -> None:
        """The user's models, newest first, in the combo box (item data: the file)."""
        combo = self.ui.userModelComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        try:
            entries = self.logic.userModels(self.ui.modelFolderLineEdit.currentPath)
        except Exception as e:
            logging.error(traceback.format_exc())
            entries = []
            combo.addItem(_("Cannot list the models: {error}").format(error=e), "")
        if not entries:
            combo.addItem(_("(no models of your own yet)"), "")
        for entry in entries:
            combo.addItem(entry.label(), str(entry.path))
        combo.blockSignals(wasBlocked)

    def onUserModelChosen(self, index: int) -> None:
        path = self.ui.userModelComboBox.itemData(index)
        if path and self._parameterNode is not None:
            self._parameterNode.useBundledModel = False
            self._parameterNode.modelPath = str(path)

    def onAddToTrainingSet(self) -> None:
        from ILDSegmentationLib.errors import ILDSegError

        p = self._parameterNode
        maskIsSegmentation = p.lungMask is not None and p.lungMask.IsA("vtkMRMLSegmentationNode")
        try:
            with slicer.util.WaitCursor():
                added, summary = self.logic.addToTrainingSet(
                    p.trainingFolder, p.inputVolume, p.annotationSegmentation, p.lungMask,
                    list(p.lungSegmentIDs) if maskIsSegmentation else None)
        except ILDSegError as e:
            self.ui.trainingSetLabel.text = _errorHtml(forPanel(str(e)))
            slicer.util.errorDisplay(forPanel(str(e)))
            return
        except OSError as e:
            slicer.util.errorDisplay(_("Cannot write into the training folder: {error}").format(error=e))
            return
        self.ui.trainingSetLabel.text = _("Case '{case}' added.").format(case=added.case_id) + " " + summary.message()

    def onFinetuneButton(self) -> None:
        from ILDSegmentationLib.errors import ILDSegError

        if self._finetuneJob is not None:
            self._finetuneJob.cancel()
            self.ui.finetuneStatusLabel.text = _("Cancelling...")
            self.ui.finetuneButton.enabled = False
            return
        if not self._ensureDependencies():
            return
        p = self._parameterNode
        try:
            job = self.logic.startFinetune(
                p.trainingFolder, p.modelFolder, startModel=self.logic.resolveModelPath(p.useBundledModel, p.modelPath),
                epochs=p.finetuneEpochs, device=p.device)
        except ILDSegError as e:
            self.ui.finetuneStatusLabel.text = forPanel(str(e))
            slicer.util.errorDisplay(forPanel(str(e)))
            return
        self._finetuneJob = job
        self.ui.finetuneProgressBar.value = 0
        self.ui.finetuneProgressBar.setVisible(True)
        self.ui.finetuneStatusLabel.text = job.message
        self._updateApplyButton()
        self._finetuneTimer.start()

    def _onFinetuneTimer(self) -> None:
        from ILDSegmentationLib.slicer.background import CANCELLED, FINISHED_STATES, SUCCEEDED
        from ILDSegmentationLib.errors import ILDSegError

        job = self._finetuneJob
        if job is None:
            self._finetuneTimer.stop()
            return
        state = self._pollJob(job, self.ui.finetuneProgressBar, "ILD Segmentation fine-tuning")
        if state not in FINISHED_STATES:
            if state != "cancelling":
                elapsed = int(job.elapsed_s)
                text = f"{job.message}  ({elapsed // 60}:{elapsed % 60:02d})"
                remaining = job.remaining_s
                if remaining is not None:
                    text += " " + _("At most about {minutes:.0f} min left (it stops earlier when the held-out "
                                    "accuracy stops improving).").format(minutes=max(1.0, remaining / 60))
                self.ui.finetuneStatusLabel.text = text
            return
        self._finetuneTimer.stop()
        self._finetuneJob = None
        self.ui.finetuneProgressBar.setVisible(False)
        if state == SUCCEEDED:
            try:
                report = self.logic.finishFinetune(job)
            except ILDSegError as e:
                self.ui.finetuneStatusLabel.text = forPanel(str(e))
            else:
                from ILDSegmentationLib.slicer.trainingset import describe_finetune

                if report.get("kept_start_model"):  # no better than the start model: keep that one selected
                    self.ui.finetuneStatusLabel.text = "<br>".join(
                        [_("Fine-tuning did not beat the start model; the start model stays selected.")]
                        + describe_finetune(report))
                else:
                    self.ui.finetuneStatusLabel.text = "<br>".join(
                        [_("Fine-tuned. The new model is chosen for Segment ILD (the bundled one is unchanged).")]
                        + describe_finetune(report))
                    self.updateUserModels()
                    p = self._parameterNode
                    if p is not None:
                        p.useBundledModel = False
                        p.modelPath = report["model"]
        elif state == CANCELLED:
            self.ui.finetuneStatusLabel.text = _("Fine-tuning cancelled; no model was written.")
        else:
            message = forPanel(job.error or _("fine-tuning failed"))
            self.ui.finetuneStatusLabel.text = message
            slicer.util.errorDisplay(message, windowTitle=_("Fine-tuning failed"),
                                     detailedText="\n".join(job.child.lines))
        self._updateApplyButton()

    # -- compare with an earlier scan (issue 27) -------------------------------------------
    def _updateCompareButton(self) -> None:
        p = self._parameterNode
        busy = self._running or self._finetuneJob is not None
        for widget in (self.ui.baselineVolumeSelector, self.ui.baselineSegmentationSelector,
                       self.ui.followupVolumeSelector, self.ui.followupSegmentationSelector,
                       self.ui.compareForceCheckBox):
            widget.enabled = self._compareJob is None
        if self._compareJob is not None:
            self.ui.compareButton.text = _("Cancel comparison")
            self.ui.compareButton.toolTip = _("Stop; nothing is added to the scene")
            self.ui.compareButton.enabled = True
            return
        self.ui.compareButton.text = _("Compare")
        chosen = p is not None and p.compareBaselineVolume is not None and p.compareFollowupVolume is not None
        same = chosen and p.compareBaselineVolume is p.compareFollowupVolume
        self.ui.compareButton.enabled = chosen and not same and not busy
        self.ui.compareButton.toolTip = (_("Choose the baseline and the follow-up CT") if not chosen else
                                         _("The baseline and the follow-up are the same volume: choose the "
                                           "other scan") if same else
                                         _("Another run is going on") if busy else
                                         _("Compare the two CTs in a separate process"))

    def onCompareButton(self) -> None:
        from ILDSegmentationLib.errors import ILDSegError

        if self._compareJob is not None:
            self._compareJob.cancel()
            self.ui.compareStatusLabel.text = _("Cancelling...")
            self.ui.compareButton.enabled = False
            return
        if not self._ensureDependencies():
            return
        p = self._parameterNode
        try:
            with slicer.util.WaitCursor():
                job = self.logic.startCompare(
                    p.compareBaselineVolume, p.compareFollowupVolume,
                    baselineSegmentation=p.compareBaselineSegmentation,
                    followupSegmentation=p.compareFollowupSegmentation,
                    modelPath=self.logic.resolveModelPath(p.useBundledModel, p.modelPath), device=p.device,
                    force=p.compareForce)
        except ILDSegError as e:
            self.ui.compareStatusLabel.text = _errorHtml(forPanel(str(e)))
            slicer.util.errorDisplay(forPanel(str(e)))
            return
        self._compareJob = job
        self._discardCompareResult = False
        self.ui.compareProgressBar.value = 0
        self.ui.compareProgressBar.setVisible(True)
        self.ui.compareStatusLabel.text = job.message
        self._updateApplyButton()
        self._compareTimer.start()

    def _onCompareTimer(self) -> None:
        """A few times a second: the comparison's progress; at its end, its results."""
        from ILDSegmentationLib.slicer.background import CANCELLED, FINISHED_STATES, SUCCEEDED
        from ILDSegmentationLib.errors import ILDSegError

        job = self._compareJob
        if job is None:
            self._compareTimer.stop()
            return
        state = self._pollJob(job, self.ui.compareProgressBar, "ILD Segmentation comparison")
        if state not in FINISHED_STATES:
            if state != "cancelling":
                self.ui.compareStatusLabel.text = f"{job.message}  ({job.elapsed_s:.0f} s)"
            return
        self._compareTimer.stop()
        self._compareJob = None
        self.ui.compareProgressBar.setVisible(False)
        if self._discardCompareResult:  # the scene closed during the run
            job.cleanup()
            self.ui.compareStatusLabel.text = _("Stopped: the scene was closed.")
        elif state == SUCCEEDED:
            try:
                self._showComparison(self.logic.finishCompare(job))
            except ILDSegError as e:
                self.ui.compareStatusLabel.text = _errorHtml(forPanel(str(e)))
                slicer.util.errorDisplay(forPanel(str(e)))
            except Exception as e:  # the panel must come back to "Compare" whatever went wrong
                logging.error(traceback.format_exc())
                self.ui.compareStatusLabel.text = _errorHtml(_("Failed: {error}").format(error=e))
                slicer.util.errorDisplay(_("Unexpected error: {error}").format(error=e),
                                         detailedText=traceback.format_exc())
        elif state == CANCELLED:
            self.ui.compareStatusLabel.text = _("Comparison cancelled. Nothing was changed.")
        else:
            message = forPanel(job.error or _("the comparison failed"))
            self.ui.compareStatusLabel.text = _errorHtml(message)
            slicer.util.errorDisplay(message, windowTitle=_("Comparison failed"),
                                     detailedText="\n".join(job.child.lines))
        self._updateApplyButton()

    def _showComparison(self, result) -> None:
        """The change table, the summary lines, and the two scans side by side in
        linked views with the change map over them."""
        from ILDSegmentationLib.slicer.compare import describe_change

        self.logic.showComparison(result)  # on the baseline the comparison ran on, whatever the panel shows now
        slicer.util.resetSliceViews()
        self.ui.compareTableView.setMRMLTableNode(result.table_node)
        self.ui.compareTableView.setVisible(True)
        self.ui.compareStatusLabel.text = "<br>".join(
            forPanel(line).replace("&", "&amp;").replace("<", "&lt;") for line in describe_change(result.summary))

    def _openInSegmentEditor(self, segmentationNode, volumeNode) -> None:
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.SegmentEditorWidget.editor
        editor.setSegmentationNode(segmentationNode)
        if volumeNode is not None:
            if hasattr(editor, "setSourceVolumeNode"):
                editor.setSourceVolumeNode(volumeNode)
            else:  # Slicer before 5.4
                editor.setMasterVolumeNode(volumeNode)

    @staticmethod
    def describeInputChecks(warnings: List[str]) -> str:
        """The input checks' warnings as HTML for the panel (orange: the run was not
        stopped), or a line saying the scan looks like the paper's HRCT."""
        if not warnings:
            return _("Input checks: the CT looks like the HRCT the method was made for.")
        items = "".join("<li>" + forPanel(w).replace("&", "&amp;").replace("<", "&lt;") + "</li>" for w in warnings)
        return ("<span style='color:#c06000'><b>" + _("Input checks: the labels may be less reliable because")
                + "</b><ul>" + items + "</ul></span>")

    def onEditSegmentation(self) -> None:
        p = self._parameterNode
        if p is None or p.outputSegmentation is None:
            return
        self._openInSegmentEditor(p.outputSegmentation, p.inputVolume)


#
# Logic
#
class ILDSegmentationLogic(ScriptedLoadableModuleLogic):
    """GUI-free: usable from the Python console or a script. Errors are raised as
    ILDSegmentationLib.errors.ILDSegError subclasses with a one-line message."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._model = None
        self._modelKey = None
        loadTerminology()

    def getParameterNode(self) -> ILDSegmentationParameterNode:
        return ILDSegmentationParameterNode(super().getParameterNode())

    # -- dependencies ----------------------------------------------------------------
    @staticmethod
    def torchAvailable() -> bool:
        """Installed (found by importlib; it may still fail to load: torchImportProblem)."""
        return importlib.util.find_spec("torch") is not None

    @staticmethod
    def torchLoaded() -> bool:
        """Already imported in this session (by a run, or by another module)."""
        return "torch" in sys.modules

    def installTorch(self, requirement: str = TORCH_REQUIREMENT) -> None:
        """Install torch (only torch: the library needs no torchvision) the way the
        PyTorch extension does, with light-the-torch, which picks the build that
        matches the GPU driver (or a CPU build), but never importing torch into
        Slicer's process: the install runs in a separate PythonSlicer process and
        torch is loaded by the runs' own processes. (PyTorchUtilsLogic.installTorch
        also installs torchvision and imports torch at its end; on Windows a loaded
        torch cannot be replaced or uninstalled until Slicer restarts.) Raises
        subprocess.CalledProcessError when the installation fails."""
        slicer.util.pip_install("light-the-torch>=0.5")
        command = [self.pythonExecutable(), "-m", "light_the_torch", "install", "torch" + requirement]
        logging.info(f"ILD Segmentation: installing PyTorch: {' '.join(command)}")
        process = slicer.util.launchConsoleProcess(command, useStartupEnvironment=False)
        slicer.util.logProcessOutput(process)  # raises CalledProcessError on failure
        importlib.invalidate_caches()

    @staticmethod
    def missingPipPackages() -> List[str]:
        return [name for name in PIP_REQUIREMENTS if importlib.util.find_spec(name) is None]

    # -- model -----------------------------------------------------------------------
    @staticmethod
    def resolveModelPath(useBundledModel: bool, modelPath) -> Optional[str]:
        """None means the bundled model; so does an empty path (a pathlib.Path of "" is ".")."""
        if useBundledModel or modelPath is None:
            return None
        text = str(modelPath).strip()
        if text in ("", ".") or os.path.isdir(text):
            return None
        return text

    def describeModel(self, modelPath: Optional[str]) -> str:
        """Name, classes and provenance of a model file, as HTML for the panel. Reads
        the file's metadata only: needs no torch (none is imported)."""
        try:
            from ILDSegmentationLib.engine.modelfile import default_model_path, read_info
            from ILDSegmentationLib.errors import ILDSegError
        except Exception as e:  # e.g. numpy broken or missing
            return _errorHtml(_("Cannot read models: {error}").format(error=e))
        path = modelPath or str(default_model_path())
        try:
            info = read_info(path)
        except ILDSegError as e:
            return _errorHtml(str(e))
        classes = ", ".join(str(c.get("name")) for c in info.classes)
        provenance = info.provenance or {}
        lines = [f"<b>{info.name}</b> ({'trained' if info.trained else 'UNTRAINED: labels are meaningless'})",
                 f"Classes: {classes}"]
        for key in ("trained_on", "created", "command", "warning"):
            if provenance.get(key):
                lines.append(f"{key.replace('_', ' ').capitalize()}: {provenance[key]}")
        if provenance.get("metrics"):
            lines.append(f"Metrics: {provenance['metrics']}")
        if info.pixel_spacing_mm:
            low, high = info.pixel_spacing_mm
            lines.append(f"Trained at pixel sizes {low:.2f}-{high:.2f} mm")
        lines.append(f"File: {path}")
        return "<br>".join(lines)

    def loadModel(self, modelPath: Optional[str] = None):
        """Load (and keep, for the next run) a model; None = bundled."""
        from ILDSegmentationLib.engine.modelfile import default_model_path, load_model

        path = os.path.abspath(modelPath) if modelPath else str(default_model_path())
        key = (path, os.path.getmtime(path) if os.path.exists(path) else None)
        if self._model is None or self._modelKey != key:
            self._model = load_model(path, device="cpu")
            self._modelKey = key
        return self._model

    # -- device ----------------------------------------------------------------------
    @staticmethod
    def torchDevice(choice: str) -> str:
        """Panel choice (Auto / GPU / CPU) -> library device name."""
        choice = (choice or "Auto").strip().lower()
        if choice == "cpu":
            return "cpu"
        if choice == "gpu":
            import torch
            mps = getattr(torch.backends, "mps", None)
            if not torch.cuda.is_available() and mps is not None and mps.is_available():
                return "mps"
            return "cuda"  # the library explains why when no CUDA GPU is usable
        return "auto"

    def describeDevice(self, choice: str) -> str:
        """The device a run would use, as HTML. Imports nothing heavy: until torch is
        loaded (by the first run) it says so, so that opening the panel does not load
        torch (on Windows, PyTorch Utils cannot replace a torch whose DLLs are loaded)."""
        if not self.torchLoaded():
            if not self.torchAvailable():
                return _("PyTorch is not installed yet: it will be offered when you click Segment ILD.")
            return _("Device: {choice}. PyTorch is loaded, and the device checked, in a separate process "
                     "when you click Segment ILD; the device used is shown after the run.").format(choice=choice)
        try:
            import torch
            from ILDSegmentationLib.engine.device import describe_device, select_device, why_no_gpu
            from ILDSegmentationLib.errors import DeviceError
        except Exception as e:  # a broken torch
            return _errorHtml(_("PyTorch cannot be loaded: {error}").format(error=e))
        try:
            device = select_device(self.torchDevice(choice))
        except DeviceError as e:
            return _errorHtml(str(e))
        text = _("Runs on: {device}").format(device=describe_device(device))
        if device.type == "cpu":
            if torch.cuda.is_available():
                text += "<br>" + _("CPU chosen although a GPU is available.")
            else:
                text += "<br>" + _("No GPU used: {reason}").format(reason=why_no_gpu())
                if torch.version.cuda is None:
                    text += "<br>" + _("With an NVIDIA GPU, use the PyTorch Utils module to install a CUDA build.")
        return text

    # -- lung mask -------------------------------------------------------------------
    @staticmethod
    def defaultLungSegmentIDs(segmentationNode) -> List[str]:
        """Segments whose name mentions the lung, else all segments."""
        from ILDSegmentationLib.slicer.mrml import default_lung_segment_ids

        return default_lung_segment_ids(segmentationNode)

    # -- the run in a separate process (the panel's) -----------------------------------
    @staticmethod
    def pythonExecutable() -> str:
        """Slicer's Python: PythonSlicer (inside Slicer, sys.executable is Slicer
        itself), as SlicerTotalSegmentator runs its command. Found where Slicer says
        it is installed (findPythonSlicer), so that no PATH setting is needed (a test
        runner's PATH may lack it); PATH is the last resort, as slicer.util uses it."""
        from ILDSegmentationLib.errors import ILDSegError

        app = getattr(slicer, "app", None)
        found = findPythonSlicer(app.slicerHome if app is not None else None, sys.executable)
        found = found or shutil.which("PythonSlicer")
        if found:
            return found
        if os.path.basename(sys.executable).lower().startswith("python"):
            return sys.executable  # a plain Python (e.g. PythonSlicer running this script)
        raise ILDSegError(_("Slicer's Python (PythonSlicer) was not found next to Slicer; reinstall Slicer."))

    @staticmethod
    def backgroundDevice(choice: str) -> str:
        """Panel choice (Auto / GPU / CPU) -> the command's --device, without importing
        torch here: the separate process checks it and says why when no GPU is usable."""
        choice = (choice or "Auto").strip().lower()
        if choice == "cpu":
            return "cpu"
        if choice == "gpu":
            return "mps" if sys.platform == "darwin" else "cuda"
        return "auto"

    def startProcess(self, inputVolume, lungMaskNode=None, outputSegmentationNode=None, lungSegmentIDs=None,
                     modelPath: Optional[str] = None, device: str = "Auto", probabilities: bool = False,
                     pixelSpacing: str = "model", cropBox: str = "mask", decision: str = "Auto",
                     maxMemoryMB: float = BACKGROUND_BATCH_MEMORY_MB):
        """Start the segmentation in a separate process and return the running
        ILDSegmentationLib.slicer.background.SegmentationJob: poll() it (from a QTimer), cancel()
        it, and after SUCCEEDED pass it to finishProcess(). Arguments as process();
        maxMemoryMB bounds one batch of slices in the separate process. Bad inputs
        raise ILDSegError here, before anything starts."""
        from ILDSegmentationLib.slicer.background import SegmentationJob

        job = SegmentationJob(
            slicer.mrmlScene, inputVolume, lungMaskNode, outputSegmentationNode, segment_ids=lungSegmentIDs,
            model=modelPath, device=self.backgroundDevice(device) if device in DEVICE_CHOICES else device,
            probabilities=probabilities, pixel_spacing=pixelSpacing, max_memory_mb=maxMemoryMB, crop_box=cropBox,
            decision=decision.lower(),
            python=self.pythonExecutable(), env=slicer.util.startupEnvironment(),
            temp_root=slicer.app.temporaryPath)
        return job.start()

    @staticmethod
    def finishProcess(job):
        """Load a finished run's results into its output nodes (the same nodes
        process() writes); returns ILDSegmentationLib.slicer.mrml.ProcessResult."""
        logging.info(f"ILD segmentation finished in a separate process in {job.elapsed_s:.1f} s")
        return job.finish()

    # -- teaching it your site's disease (issue 16) ---------------------------------------
    @staticmethod
    def createAnnotationSegmentation(inputVolume):
        """A segmentation with the six class segments, empty, over the CT, to paint in."""
        from ILDSegmentationLib.slicer.trainingset import create_annotation_segmentation

        return create_annotation_segmentation(slicer.mrmlScene, inputVolume)

    @staticmethod
    def addToTrainingSet(trainingFolder: str, inputVolume, annotationNode, lungMaskNode=None,
                         lungSegmentIDs=None):
        """Store the CT, its lung mask and the painted labels as a case of the training
        folder's manifest; returns (the added case, the set's summary)."""
        from ILDSegmentationLib.slicer.trainingset import add_case, summarize

        added = add_case(trainingFolder, inputVolume, annotationNode, lungMaskNode, lungSegmentIDs)
        return added, summarize(trainingFolder)

    @staticmethod
    def trainingSetSummary(trainingFolder: str):
        from ILDSegmentationLib.slicer.trainingset import summarize

        return summarize(trainingFolder)

    @staticmethod
    def userModels(modelFolder: str):
        from ILDSegmentationLib.slicer.trainingset import list_models

        return list_models(modelFolder)

    def startFinetune(self, trainingFolder: str, modelFolder: str, startModel: Optional[str] = None,
                      epochs: int = 40, device: str = "Auto", valFraction: float = 0.25):
        """Fine-tune ``startModel`` (None: the bundled model) on the training folder in a
        separate process, into a new run folder of ``modelFolder``; returns the running
        ILDSegmentationLib.slicer.background.FinetuneJob (poll, cancel, then finishFinetune)."""
        from ILDSegmentationLib.slicer.background import FinetuneJob
        from ILDSegmentationLib.slicer.trainingset import MANIFEST_NAME, new_run_folder

        from ILDSegmentationLib.errors import InputError

        if not str(trainingFolder or "").strip():
            raise InputError(_("choose a training folder first"))
        low, high = FINETUNE_EPOCHS_RANGE
        if not low <= int(epochs) <= high:  # e.g. a scene saved before the spin box had its range
            raise InputError(_("the number of epochs must be {low} to {high}, not {epochs}").format(
                low=low, high=high, epochs=epochs))
        job = FinetuneJob(
            os.path.join(trainingFolder, MANIFEST_NAME), str(new_run_folder(modelFolder)), start_model=startModel,
            epochs=epochs, val_fraction=valFraction,
            device=self.backgroundDevice(device) if device in DEVICE_CHOICES else device,
            python=self.pythonExecutable(), env=slicer.util.startupEnvironment(), temp_root=slicer.app.temporaryPath)
        return job.start()

    @staticmethod
    def finishFinetune(job):
        """The finished run's report (finetune.json; ``model``: the new model file)."""
        logging.info(f"ILD Segmentation fine-tuning finished in {job.elapsed_s:.0f} s")
        return job.finish()

    # -- compare with an earlier scan (issue 27) -------------------------------------------
    def startCompare(self, baselineVolume, followupVolume, baselineSegmentation=None, followupSegmentation=None,
                     modelPath: Optional[str] = None, device: str = "Auto", force: bool = False):
        """Compare two CTs of one patient (ildseg compare) in a separate process and
        return the running ILDSegmentationLib.slicer.compare.CompareJob: poll() it,
        cancel() it, and after SUCCEEDED pass it to finishCompare(). The segmentations,
        when given, are earlier Segment ILD results reused instead of segmenting again.
        Bad inputs raise ILDSegError here, before anything starts."""
        from ILDSegmentationLib.slicer.compare import CompareJob

        job = CompareJob(
            slicer.mrmlScene, baselineVolume, followupVolume, baseline_segmentation=baselineSegmentation,
            followup_segmentation=followupSegmentation, model=modelPath,
            device=self.backgroundDevice(device) if device in DEVICE_CHOICES else device, force=force,
            python=self.pythonExecutable(), env=slicer.util.startupEnvironment(), temp_root=slicer.app.temporaryPath)
        return job.start()

    @staticmethod
    def finishCompare(job):
        """Load a finished comparison: the change map (a segmentation node on the
        baseline), the change table, the follow-up registered onto the baseline grid;
        returns ILDSegmentationLib.slicer.compare.CompareResult (and its summary)."""
        logging.info(f"ILD comparison finished in a separate process in {job.elapsed_s:.1f} s")
        return job.finish()

    @staticmethod
    def showComparison(result) -> None:
        """Baseline and registered follow-up side by side (axial), linked, the change map over both."""
        from ILDSegmentationLib.slicer.compare import link_views

        link_views(slicer.mrmlScene, result)

    # -- the job in this process (scripts, the self-test) ---------------------------------
    def releaseDeviceMemory(self) -> None:
        """After a run in this process on a GPU: the kept model goes back to the CPU and
        torch's cached GPU memory is released, so that Slicer and other modules get it
        back. (The panel's run is a separate process: its memory goes when it ends.)"""
        torch = sys.modules.get("torch")
        if torch is None:
            return
        if self._model is not None:
            self._model.network.to("cpu")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        mps = getattr(torch, "mps", None)
        if mps is not None and getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            mps.empty_cache()

    def process(self, inputVolume, lungMaskNode=None, outputSegmentationNode=None, lungSegmentIDs=None,
                modelPath: Optional[str] = None, device: str = "Auto", probabilities: bool = False,
                progress: Optional[Callable[[float, str], None]] = None,
                cancel: Optional[Callable[[], bool]] = None, cpuFallback: bool = True,
                pixelSpacing: str = "model", cropBox: str = "mask", decision: str = "Auto"):
        """Segment ILD patterns of ``inputVolume`` into a segmentation node.

        lungMaskNode: None (computed automatically), a label map or a segmentation
        (lungSegmentIDs chooses its lung segments; default all). outputSegmentationNode:
        None creates one, else it is updated with its results table and probability
        maps. device: Auto, GPU or CPU (or a library name such as "cuda:1").
        progress(fraction, message) is called between slice batches; cancel() -> True
        stops the run and leaves the scene as it was. Out of GPU memory, batches are
        halved, then the run finishes on the CPU (cpuFallback) or raises DeviceError.
        pixelSpacing: "model" (a CT outside the model's training range of pixel sizes is
        resampled in-plane into it) or "native". cropBox: "mask" (the paper's crop
        boxes) or "aerated" (ildseg segment --crop-box). decision: Auto (the model's rule
        for whole lungs), Paper (the paper's argmax) or Prior (the model's class prior).
        Returns ILDSegmentationLib.slicer.mrml.ProcessResult (segmentation_node, table_node, ...).
        """
        from ILDSegmentationLib.slicer import mrml
        from ILDSegmentationLib.errors import ILDSegError

        problem = torchImportProblem()  # torch is loaded here, on the first run
        if problem:
            raise ILDSegError(problem)
        from ILDSegmentationLib.engine.device import select_device

        startTime = time.time()
        logging.info("ILD segmentation started")
        torchDevice = self.torchDevice(device) if device in DEVICE_CHOICES else device
        deviceType = select_device(torchDevice).type
        model = self.loadModel(modelPath)
        try:
            result = mrml.process(
                slicer.mrmlScene, inputVolume, lungMaskNode, outputSegmentationNode, model=model, device=torchDevice,
                segment_ids=lungSegmentIDs, progress=progress, cancel=cancel, probabilities=probabilities,
                max_memory_mb=CPU_BATCH_MEMORY_MB if deviceType == "cpu" else GPU_BATCH_MEMORY_MB,
                cpu_fallback=cpuFallback, pixel_spacing=pixelSpacing, crop_box=cropBox, decision=decision.lower())
        finally:
            if deviceType != "cpu":
                self.releaseDeviceMemory()
        logging.info(f"ILD segmentation completed in {time.time() - startTime:.1f} s on {result.device}")
        return result


#
# Test
#
class ILDSegmentationTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer (see README for the command line): resources, library and
    terminology, then the whole scenario on a synthetic chest CT with an oblique grid.
    Inference is skipped, with a message, when PyTorch is not installed."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_ModuleFilesAndTerminology()
        self.setUp()
        self.test_LungMaskResampling()
        self.setUp()
        self.test_SegmentSyntheticChest()
        self.setUp()
        self.test_TeachItYourSite()
        self.setUp()
        self.test_CompareWithEarlierScan()

    # -- helpers ---------------------------------------------------------------------
    @staticmethod
    def _geometry(direction, spacing, shape, centre=(0.0, 0.0, 0.0)):
        import numpy as np
        from ILDSegmentationLib.imaging.geometry import Geometry

        direction = np.asarray(direction, float)
        nIJK = np.array(shape[::-1], float)
        origin = np.asarray(centre) - direction @ (np.asarray(spacing) * (nIJK - 1) / 2)
        return Geometry(tuple(spacing), tuple(origin), tuple(direction.ravel()))

    @staticmethod
    def _points(geometry, shape):
        import numpy as np

        k, j, i = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
        ijk = np.stack([i, j, k], -1).astype(float) * np.asarray(geometry.spacing)
        return ijk @ geometry.direction_matrix.T + np.asarray(geometry.origin)

    @staticmethod
    def _lungs(points):
        import numpy as np

        x, y, z = points[..., 0], points[..., 1], points[..., 2]
        out = np.zeros(points.shape[:-1], np.uint8)
        out[((x + 60) / 45) ** 2 + (y / 75) ** 2 + (z / 200) ** 2 < 1] = 1
        out[((x - 60) / 45) ** 2 + (y / 75) ** 2 + (z / 200) ** 2 < 1] = 2
        return out

    def _addVolume(self, array, geometry, name, className="vtkMRMLScalarVolumeNode"):
        from ILDSegmentationLib.slicer import nodes

        node = slicer.mrmlScene.AddNewNodeByClass(className, name)
        slicer.util.updateVolumeFromArray(node, array)
        nodes.set_volume_geometry(node, geometry)
        node.CreateDefaultDisplayNodes()
        return node

    def _syntheticChest(self):
        """CT stored with index I running superior and a 12-degree oblique rotation,
        and a lung label map on another (axis-aligned, finer) grid."""
        import numpy as np

        angle = np.radians(12.0)
        rotation = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
        direction = rotation @ np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
        shape = (64, 64, 6)
        ctGeometry = self._geometry(direction, (5.0, 5.0, 5.0), shape)
        points = self._points(ctGeometry, shape)
        x, y = points[..., 0], points[..., 1]
        hu = np.full(shape, -1000.0)
        hu[(x / 130) ** 2 + (y / 110) ** 2 < 1] = 40.0
        hu[self._lungs(points) > 0] = -850.0
        hu += np.random.default_rng(0).normal(0, 20, shape)
        ct = self._addVolume(hu.astype(np.int16), ctGeometry, "Synthetic chest CT")
        maskShape = (20, 90, 90)
        maskGeometry = self._geometry(np.eye(3), (3.7, 3.7, 2.5), maskShape)
        mask = self._addVolume(self._lungs(self._points(maskGeometry, maskShape)), maskGeometry, "Synthetic lungs",
                               "vtkMRMLLabelMapVolumeNode")
        return ct, mask, ctGeometry, shape

    # -- tests -----------------------------------------------------------------------
    def test_ModuleFilesAndTerminology(self) -> None:
        self.delayDisplay("Checking module resources, library and terminology")
        for relativePath in (UI_FILE, ICON_FILE, TERMINOLOGY_FILE):
            self.assertTrue(os.path.isfile(_resourcePath(relativePath)), relativePath)
        self.assertIsNotNone(_LIBRARY_FOLDER, "ILDSegmentationLib not found next to the module or one level up")
        from ILDSegmentationLib.terminology import TERMINOLOGY_CONTEXT
        self.assertEqual(loadTerminology(), TERMINOLOGY_CONTEXT)
        self.delayDisplay("Resources OK")

    def test_LungMaskResampling(self) -> None:
        """MRML geometry and the lung mask, which need no PyTorch."""
        import numpy as np
        from ILDSegmentationLib.slicer import nodes

        self.delayDisplay("Checking geometry and lung mask resampling")
        ct, mask, ctGeometry, shape = self._syntheticChest()
        hu, geometry = nodes.volume_array_and_geometry(ct)
        np.testing.assert_allclose(geometry.direction, ctGeometry.direction, atol=1e-9)
        lungMask = nodes.lung_mask_from_node(mask, ct)
        expected = self._lungs(self._points(ctGeometry, shape)) > 0
        self.assertLess(((lungMask > 0) != expected).sum(), 0.08 * expected.sum())
        self.delayDisplay("Geometry and lung mask OK")

    def test_SegmentSyntheticChest(self) -> None:
        import numpy as np
        from ILDSegmentationLib.slicer import mrml, nodes
        from ILDSegmentationLib.classes import CLASSES
        from ILDSegmentationLib.errors import Cancelled
        from ILDSegmentationLib.terminology import terminology_entry

        logic = ILDSegmentationLogic()
        if not logic.torchAvailable() or logic.missingPipPackages():
            message = ("PyTorch (or safetensors/scipy) is not installed: inference test SKIPPED. Install the "
                       "PyTorch extension and run the module once to install the rest.")
            logging.warning(message)
            self.delayDisplay(message)
            return

        self.delayDisplay("Segmenting a synthetic chest CT")
        ct, mask, ctGeometry, shape = self._syntheticChest()
        ctBefore = slicer.util.arrayFromVolume(ct).copy()
        ctMTime = ct.GetMTime()
        result = logic.process(ct, mask, None, device="CPU")
        seg = result.segmentation_node
        self.assertEqual(mrml.segment_ids_of(seg), [c.segment_id for c in CLASSES])
        for c in CLASSES:
            segment = seg.GetSegmentation().GetSegment(c.segment_id)
            self.assertEqual(segment.GetName(), c.name)
            np.testing.assert_allclose(segment.GetColor(), c.color, atol=1e-6)
            self.assertEqual(mrml.segment_tag(segment, slicer.vtkSegment.GetTerminologyEntryTagName()),
                             terminology_entry(c))
        rows = mrml.results_from_table(result.table_node)
        self.assertEqual(len(rows), len(CLASSES) + 1)
        labels = nodes.segments_to_array(seg, [c.segment_id for c in CLASSES], ct)
        voxelML = float(np.prod(ctGeometry.spacing)) / 1000.0
        self.assertAlmostEqual(rows[-1][mrml.COL_VOLUME], int((labels > 0).sum()) * voxelML, places=6)

        self.delayDisplay("Running again into the same segmentation")
        nodeCount = slicer.mrmlScene.GetNumberOfNodes()
        again = logic.process(ct, mask, seg, device="CPU")
        self.assertIs(again.segmentation_node, seg)
        self.assertIs(again.table_node, result.table_node)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodeCount)

        self.delayDisplay("The panel's run: a separate process, results in the same nodes")
        from ILDSegmentationLib.slicer.background import FINISHED_STATES, SUCCEEDED

        # The in-process run's batch memory, so that both runs batch the slices alike.
        job = logic.startProcess(ct, mask, seg, device="CPU", maxMemoryMB=CPU_BATCH_MEMORY_MB)
        deadline = time.monotonic() + SELF_TEST_RUN_TIMEOUT_S
        while job.poll() not in FINISHED_STATES:
            if time.monotonic() > deadline:
                job.cancel()
                job.cleanup()  # stops the child and removes its folder
                self.fail(f"the run in a separate process did not finish within {SELF_TEST_RUN_TIMEOUT_S} s")
            slicer.app.processEvents()  # the panel's timer does this without a loop
            time.sleep(0.05)
        self.assertEqual(job.state, SUCCEEDED, job.error)
        background = logic.finishProcess(job)
        self.assertIs(background.segmentation_node, seg)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodeCount)
        # Another process may use other threads (other summation order): labels may
        # differ where two classes tie, never more than SELF_TEST_MAX_DISAGREEMENT.
        again = nodes.segments_to_array(seg, [c.segment_id for c in CLASSES], ct)
        self.assertEqual(int((again > 0).sum()), int((labels > 0).sum()))  # the same lung
        lung = labels > 0
        self.assertLessEqual(float((again[lung] != labels[lung]).mean()), SELF_TEST_MAX_DISAGREEMENT)

        self.delayDisplay("Cancelling leaves the scene as it was")
        with self.assertRaises(Cancelled):
            logic.process(ct, None, seg, device="CPU", cancel=lambda: True)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodeCount)
        self.assertTrue(np.array_equal(slicer.util.arrayFromVolume(ct), ctBefore))
        self.assertEqual(ct.GetMTime(), ctMTime)
        self.delayDisplay("Test passed")

    def test_TeachItYourSite(self) -> None:
        """Annotation segmentation, training folder and model folder (the fine-tuning
        itself is tested outside Slicer, Testing/Python/test_trainingset.py)."""
        import tempfile

        import numpy as np
        from ILDSegmentationLib.slicer import mrml, nodes
        from ILDSegmentationLib.classes import CLASSES

        self.delayDisplay("Annotating a case and adding it to a training folder")
        logic = ILDSegmentationLogic()
        ct, mask, ctGeometry, shape = self._syntheticChest()
        annotation = logic.createAnnotationSegmentation(ct)
        self.assertEqual(mrml.segment_ids_of(annotation), [c.segment_id for c in CLASSES])
        lungs = nodes.lung_mask_from_node(mask, ct)
        painted = np.zeros(shape, np.uint8)
        painted[..., 2][lungs[..., 2] > 0] = 1  # one axial slice painted healthy
        mrml.write_labels_to_segmentation(painted, ct, annotation)
        with tempfile.TemporaryDirectory() as folder:
            added, summary = logic.addToTrainingSet(folder, ct, annotation, mask)
            self.assertEqual(summary.cases, 1)
            self.assertEqual(summary.pixels["Healthy"], int(painted.astype(bool).sum()))
            self.assertIn("No examples yet of", summary.message())
            self.assertTrue(os.path.isfile(os.path.join(folder, "manifest.csv")))
            self.assertEqual(logic.userModels(folder), [])
        self.delayDisplay("Training folder OK")

    def test_CompareWithEarlierScan(self) -> None:
        """The panel's comparison: a separate process, the change map, the registered
        follow-up and the table added, the two scans linked side by side. The scans are
        the synthetic chest and the same chest moved 5 mm, with earlier segmentations
        reused (all lung healthy): nothing changed. (The comparison itself is tested
        outside Slicer on real CT: Testing/Python/test_compare.py, test_slicer_compare.py.)"""
        import numpy as np
        from ILDSegmentationLib.slicer import mrml, nodes
        from ILDSegmentationLib.slicer.background import FINISHED_STATES, SUCCEEDED

        logic = ILDSegmentationLogic()
        if not logic.torchAvailable() or logic.missingPipPackages():
            message = "PyTorch (or safetensors/scipy) is not installed: comparison test SKIPPED."
            logging.warning(message)
            self.delayDisplay(message)
            return
        self.delayDisplay("Comparing the synthetic chest with itself moved")
        ct, mask, ctGeometry, shape = self._syntheticChest()
        # The same voxels (K, J, I) on a grid moved 5 mm: the same chest, moved.
        moved = self._geometry(np.reshape(ctGeometry.direction, (3, 3)), ctGeometry.spacing, shape,
                               centre=(5.0, -5.0, 0.0))
        followup = self._addVolume(slicer.util.arrayFromVolume(ct).copy(), moved, "Synthetic chest CT, follow-up")
        lungs = nodes.lung_mask_from_node(mask, ct)  # on the CT's voxels: the follow-up's too
        segmentations = []
        for volume in (ct, followup):
            segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", volume.GetName() + " ILD")
            mrml.write_labels_to_segmentation((lungs > 0).astype(np.uint8), volume, segmentation)
            segmentations.append(segmentation)
        before = slicer.util.arrayFromVolume(followup).copy()
        job = logic.startCompare(ct, followup, segmentations[0], segmentations[1], device="CPU")
        deadline = time.monotonic() + SELF_TEST_RUN_TIMEOUT_S
        while job.poll() not in FINISHED_STATES:
            if time.monotonic() > deadline:
                job.cancel()
                job.cleanup()
                self.fail(f"the comparison did not finish within {SELF_TEST_RUN_TIMEOUT_S} s")
            slicer.app.processEvents()
            time.sleep(0.05)
        self.assertEqual(job.state, SUCCEEDED, job.error)
        result = logic.finishCompare(job)
        self.assertEqual(result.summary["fibrotic_extent"]["change"], 0.0)
        self.assertFalse(result.summary["fibrotic_extent"]["significant"])
        self.assertIsNotNone(result.segmentation_node.GetSegmentation().GetSegment("change_1"))
        self.assertEqual(result.registered_followup_node.GetImageData().GetDimensions(),
                         ct.GetImageData().GetDimensions())
        self.assertGreater(result.table_node.GetTable().GetNumberOfRows(), 7)
        logic.showComparison(result)
        layoutManager = slicer.app.layoutManager()
        if layoutManager is None:  # --no-main-window: there are no views to link
            self.delayDisplay("No main window: the linked views are not checked")
        else:
            slicer.app.processEvents()  # the layout manager makes the side-by-side views
            self.assertEqual(layoutManager.layout, slicer.vtkMRMLLayoutNode.SlicerLayoutSideBySideView)
            red = layoutManager.sliceWidget("Red").mrmlSliceCompositeNode()
            yellow = layoutManager.sliceWidget("Yellow").mrmlSliceCompositeNode()
            self.assertEqual(red.GetBackgroundVolumeID(), ct.GetID())
            self.assertEqual(yellow.GetBackgroundVolumeID(), result.registered_followup_node.GetID())
            self.assertTrue(red.GetLinkedControl() and yellow.GetLinkedControl())
            self.assertEqual(layoutManager.sliceWidget("Yellow").mrmlSliceNode().GetOrientation(), "Axial")
        self.assertTrue(np.array_equal(slicer.util.arrayFromVolume(followup), before))
        self.delayDisplay("Test passed")
