"""The testbed VLM: a small LLaVA trained from scratch on the synthetic world so that pruning can be measured.

``tokenizer`` builds the offline word-level tokenizer and processor, ``model`` the LLaVA config, ``train`` the
staged training recipe; the trained weights ship in ``model/`` and load as the model reference ``testbed``.
"""

from __future__ import annotations

from worker.hipp.models.builtin import TESTBED_DIR as MODEL_DIR

__all__ = ["MODEL_DIR"]
