"""dasam3: Dual-Adaptive SAM3 — a routed mixture of low-rank experts over frozen FFNs, and the medical
segmentation pipeline around it."""

__version__ = "0.1.0"
