"""Reproducible companion to Godey & Artzi (2026), "Lost in Backpropagation: The LM Head
is a Gradient Bottleneck", arXiv:2603.10145.

Shape letters used throughout the package:
    B batch, T time (sequence position), C = B*T contexts (token positions),
    D hidden width, V vocabulary size, r head rank.
"""

__version__ = "0.1.0"
