"""Knowledge editing with RoseLoRA: ``sa.edit.apply_edits(model, tokenizer, edits, config)`` and its metrics."""

from .countries import RELATIONS, Relation, capital_facts, counterfactual_edits, known_facts, relation_facts
from .editing import (
    EDIT_METHODS,
    Edit,
    EditConfig,
    EditMetrics,
    apply_edits,
    generic_prefixes,
    generic_subjects,
    infer_subject,
    mean_metrics,
    neighbour_prompts,
    results_table,
    similar_subjects,
    subject_representations,
)

__all__ = ["EDIT_METHODS", "Edit", "EditConfig", "EditMetrics", "RELATIONS", "Relation", "apply_edits",
           "capital_facts", "counterfactual_edits", "generic_prefixes", "generic_subjects", "infer_subject",
           "known_facts", "mean_metrics", "neighbour_prompts", "relation_facts", "results_table", "similar_subjects",
           "subject_representations"]
