"""``changescribe:importcheckpoint``: a published checkpoint (e.g. BIT's best_ckpt.pt) -> a ChangeScribe model file.

The work is :func:`changescribe.core.published.import_checkpoint`, shared with ``changescribe models import`` and
the dock's *Import checkpoint…* entry; this wraps it for the toolbox, the modeler, batch mode and ``qgis_process``.
"""

from __future__ import annotations

from qgis.core import (
    QgsProcessingException,
    QgsProcessingOutputFile,
    QgsProcessingParameterEnum,
    QgsProcessingParameterFile,
    QgsProcessingParameterFolderDestination,
    QgsProcessingParameterString,
)

from ..core.published import FAMILIES, default_folder, default_name, published_checkpoints
from .processing_support import ChangeScribeAlgorithm, import_core, processing_errors


class ImportCheckpointAlgorithm(ChangeScribeAlgorithm):
    CHECKPOINT, SOURCE, NAME, FOLDER, MODEL = "CHECKPOINT", "SOURCE", "NAME", "FOLDER", "MODEL"

    def name(self) -> str:
        return "importcheckpoint"

    def displayName(self) -> str:  # noqa: N802
        return "Import published checkpoint"

    def tags(self) -> list[str]:
        return ["import", "checkpoint", "weights", "published", "pretrained", "bit", "levir-cd", "model"]

    def shortHelpString(self) -> str:  # noqa: N802
        return ("Turns a checkpoint as its authors publish it (for BIT: checkpoints/BIT_LEVIR/best_ckpt.pt from the "
                "BIT_CD README) into a ChangeScribe model file (NAME.safetensors + NAME.json card) in FOLDER. The "
                "checkpoint is read with torch.load(weights_only=True): a file that holds pickled Python objects is "
                "refused, never executed. Layers that do not fit are named. An existing model file is never "
                "replaced. Put FOLDER in Settings → model folder to use the model in the dock and in Detect.")

    def initAlgorithm(self, config=None) -> None:  # noqa: N802
        add = self.add_described
        options = [label for _, _, label in published_checkpoints()]
        add(QgsProcessingParameterFile(self.CHECKPOINT, "Published checkpoint"),
            "The checkpoint file exactly as published (.pt / .pth / .pth.tar). A captioner's word map (RSICCformer: "
            "WORDMAP_*.json; Change-Agent: LEVIR_MCI/vocab.json) is read from beside it or from its ../data folder.")
        add(QgsProcessingParameterEnum(self.SOURCE, "Published by (code and training data)", options=options,
                                       defaultValue=0),
            "The code base the checkpoint comes from and the dataset it was trained on: sets the architecture, "
            "the input normalisation, the GSD and the reported metrics in the card.")
        add(QgsProcessingParameterString(self.NAME, "Model name (empty: FAMILY-DATASET)", optional=True),
            "The model's name and file name, e.g. bit-levir-cd.")
        add(QgsProcessingParameterFolderDestination(self.FOLDER, "Model folder", defaultValue=default_folder()),
            "Where to write NAME.json and NAME.safetensors; by default the model folder chosen in the dock's "
            "Settings, so the model is listed at once.")
        self.addOutput(QgsProcessingOutputFile(self.MODEL, "Model card"))

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802
        (published,) = import_core("published")
        family, dataset, _ = published_checkpoints()[self.parameterAsEnum(parameters, self.SOURCE, context)]
        checkpoint = self.parameterAsFile(parameters, self.CHECKPOINT, context)
        folder = self.parameterAsString(parameters, self.FOLDER, context)
        if not checkpoint or not folder:
            raise QgsProcessingException("give a checkpoint file and a model folder")
        name = self.parameterAsString(parameters, self.NAME, context).strip() or default_name(FAMILIES[family], dataset)
        with processing_errors():
            import_core("models.converters")  # torch: a clear message when QGIS's Python lacks it
            card = published.import_checkpoint(checkpoint, family, folder, name=name, dataset=dataset)
        feedback.pushInfo(f"model file: {card}")
        feedback.setProgress(100.0)
        return {self.MODEL: str(card)}
