"""Training: the frozen-backbone CHGNet student, the distillation loss, Lightning glue."""
