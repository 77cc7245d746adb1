"""Knowledge editing with RoseLoRA: ``sa.edit.apply_edits(model, tokenizer, edits, config)`` and its metrics."""

from .countries import capital_facts, counterfactual_edits, known_facts
from .editing import EDIT_METHODS, Edit, EditConfig, EditMetrics, apply_edits, mean_metrics, results_table

__all__ = ["EDIT_METHODS", "Edit", "EditConfig", "EditMetrics", "apply_edits", "capital_facts",
           "counterfactual_edits", "known_facts", "mean_metrics", "results_table"]
