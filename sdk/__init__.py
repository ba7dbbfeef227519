"""derm: dermatologist-level skin-lesion classification (after Esteva et al., Nature 2017), to the phone.

The light core: the disease taxonomy, the partitioning algorithm, the aggregation matrix, labelled datasets,
group-aware splits, and :class:`Classifier`, which runs an exported file (TFLite, ONNX; Core ML on macOS). It never
imports TensorFlow; the trainer (``derm.trainer``), exporter (``derm.exporter``) and benchmarks (``derm.benchmarks``)
add the heavy stacks behind extras.

A research and triage aid, not a diagnostic device.
"""

from derm._version import __version__
from derm.aggregation import (
    aggregation_matrix,
    conditional_probability,
    inference_targets,
    task_matrix,
    task_targets,
)
from derm.classifier import Classifier, Decision, Prediction
from derm.datasets import Dataset, read_dataset
from derm.errors import DatasetError, DermError, PartitionError, TaxonomyError
from derm.manifest import ModelFileError, read_manifest
from derm.partition import Partition, TrainingClass, partition
from derm.splits import Fingerprints, group_components, image_fingerprints, kfold, perceptual_hash, train_val_split
from derm.taxonomy import BinaryTask, Node, Taxonomy, default_taxonomy, load_taxonomy

__all__ = [
    "BinaryTask",
    "Classifier",
    "Dataset",
    "DatasetError",
    "Decision",
    "DermError",
    "Fingerprints",
    "ModelFileError",
    "Node",
    "Partition",
    "PartitionError",
    "Prediction",
    "Taxonomy",
    "TaxonomyError",
    "TrainingClass",
    "__version__",
    "aggregation_matrix",
    "conditional_probability",
    "default_taxonomy",
    "group_components",
    "image_fingerprints",
    "inference_targets",
    "kfold",
    "load_taxonomy",
    "partition",
    "perceptual_hash",
    "read_dataset",
    "read_manifest",
    "task_matrix",
    "task_targets",
    "train_val_split",
]
