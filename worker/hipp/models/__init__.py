"""Models: where the prunable units of each family are (``adapters``, one file per family), loading a model
reference (built-in name, folder, hub id) in its own dtype, the built-in tiny models, checkpoint export (remote
code templates in ``remote/``), export options, and the fast decode path with latency measurement.

Imports only ``errors`` and ``progress`` from the engine, plus ``data.calibration`` lazily for the decode
prompt.
"""
