"""Importers that turn public research datasets into site folders (site contract)."""
