"""Datasets that `make demo` trains on, written offline (numpy and PIL only)."""
from .synthetic import DEFAULT_CLASSES, SHAPES, generate

__all__ = ['DEFAULT_CLASSES', 'SHAPES', 'generate']
