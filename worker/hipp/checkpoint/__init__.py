"""Checkpoint I/O: a pruned model exported as a Hugging Face folder that loads anywhere (``export``; the generated
configuration and modeling files come from ``remote/``), in the source checkpoint's dtype, sharded, with the
source's processor files.

Imports ``models`` and ``pruning``.
"""
