"""ldm.evaluation: image-quality metrics (pyiqa with offline weights), reports, LPIPS loss.

``evaluate(pred, ref, metrics)`` is the entry point; ``LPIPS`` lives in :mod:`ldm.evaluation.lpips`
(imported lazily so that training code does not pull pyiqa).
"""

from ldm.evaluation.evaluate import evaluate
from ldm.evaluation.metric_weights import MissingMetricWeights
from ldm.evaluation.report import Report

__all__ = ["MissingMetricWeights", "Report", "evaluate"]
