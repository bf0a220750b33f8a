"""Recovery: LoRA and distillation fine-tuning of a pruned model (``training``) on LLaVA-format conversations
(``conversations``: loading, the world's training split, encoding).

Imports ``models``, ``data`` and ``evaluation`` (the benchmark prompts the world's conversations use).
"""
