"""Experiment tracking around a run: model summary, W&B extras, offline W&B reading, LR finder,
and the helpers the inspection notebooks share."""
