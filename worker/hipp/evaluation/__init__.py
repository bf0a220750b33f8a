"""Evaluation: benchmark tasks (``tasks``: POPE, ScienceQA, each owning its files, prompt, answer parsing and
metric), the ``runner`` that evaluates a model on task files (logits or generation), and the
``plan_evaluator`` that scores pruning plans with masks on an evaluation set.

Imports ``models``, ``data`` and ``pruning``.
"""
