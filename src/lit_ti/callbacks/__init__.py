"""Behaviour around training that is not the method itself: exports, previews, logs."""

from lit_ti.callbacks.early_stop import EarlyStop
from lit_ti.callbacks.export import ExportEmbeddings
from lit_ti.callbacks.interrupt import GracefulStop
from lit_ti.callbacks.learning_guard import LearningGuard
from lit_ti.callbacks.loss_csv import LossCSV
from lit_ti.callbacks.nan_guard import NanGuard
from lit_ti.callbacks.preview import PreviewImages
from lit_ti.callbacks.progress import StepProgress
from lit_ti.callbacks.results import RunResults
from lit_ti.callbacks.toy_eval import ToyEvaluation, ToyStyleEvaluation
from lit_ti.callbacks.val_loss import ValidationLoss

__all__ = [
    "EarlyStop",
    "ExportEmbeddings",
    "GracefulStop",
    "LearningGuard",
    "LossCSV",
    "NanGuard",
    "PreviewImages",
    "RunResults",
    "StepProgress",
    "ToyEvaluation",
    "ToyStyleEvaluation",
    "ValidationLoss",
]
