"""Recovery: LoRA and distillation fine-tuning of a pruned model on LLaVA-format conversations.

- ``config``: the methods, the validated :class:`RecoveryConfig` and the :class:`RecoveryResult`;
- ``conversations``: loading LLaVA-format data, the world's training split, encoding and collation;
- ``trainable``: which decoder linears are trained, LoRA wrapping, the merge check;
- ``losses``: cross-entropy, distillation losses and the teacher check;
- ``schedule``: the warmup + cosine learning-rate schedule (shared with the testbed recipe);
- ``training``: the loop, :func:`recover` (it re-exports the config names callers use).

Imports ``models``, ``data`` and ``evaluation`` (the benchmark prompts the world's conversations use).
"""
