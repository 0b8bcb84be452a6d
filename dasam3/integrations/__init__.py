"""Adapters that put DA-MoE layers into existing models (`dasam3.integrations.sam3.adapt_sam3`).

Submodules are imported on use: each one needs its own optional dependency.
"""
