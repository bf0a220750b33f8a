"""Data: the synthetic world (``world``: scenes and rendering), calibration images, batches and activation
statistics (``calibration``), and LLaVA-format training conversations (``conversations``).

Imports ``models``.
"""
