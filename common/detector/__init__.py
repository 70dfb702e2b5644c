"""The detector: models, the one training recipe, FROC, adaptation, DP.

Model registry, the training recipe, evaluation (FROC), semi-supervised and
few-shot adaptation, differential privacy and checkpoints.
"""
