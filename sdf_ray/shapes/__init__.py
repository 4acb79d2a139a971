"""Shapes out: reconstruct unseen shapes with a trained decoder, mesh them, and measure them.

Pure functions on tensors and arrays (``reconstruct``, ``decode``, ``meshing``, ``metrics``, ``samples``,
``work``) import no Ray; ``pipeline`` puts them on Ray and ``commands`` is the CLI.
"""
