"""Benchmarks in their official formats: POPE (``pope``) and ScienceQA (``scienceqa``).

Each module writes the testbed's synthetic version, reads the official files through the same loader, and owns
what scoring needs: its prompt (``prompt_text``), the answers scored in logits mode (``ANSWER_WORDS``) and how
their scores pick an answer (``answer_from_scores``), the official parser of generated text, and the official
metrics (``compute_metrics``). The runner and the plan evaluator call these; they hold no task rule.
"""
