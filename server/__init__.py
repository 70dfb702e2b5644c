"""The coordinator side: SuperLink, strategies, checkpoints. Imports ``common`` only."""
