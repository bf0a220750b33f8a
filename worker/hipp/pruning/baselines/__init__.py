"""Baselines as their papers define them, one small module each, registered in ``allocators.ALLOCATORS``.

- ``wanda_sp``: Wanda-sp as in FLAP's repository (allocation ``wanda-sp``): heads and MLP channels removed at
  the same ratio in every layer, layer by layer, each layer scored on calibration activations recomputed
  through the layers already pruned (the planner does the sequential part: ``Allocator.sequential``).
- ``owl``: OWL (Yin et al. 2024, allocation ``owl-paper``): layer outlier ratios (M = 5) min-max scaled to
  ``[0, 2 lambda]`` and mean-centred on the target, as the paper's code does; heads and channels at the same
  ratio inside a layer.
- ``llm_pruner``: the practitioners' convention from LLM-Pruner (allocation ``llm-pruner``): the first and last
  layers dense (4 first and 2 last of LLaMA-7B's 32, scaled to the depth), the same ratio over the rest.
- ``equal_budget``: best-of-K selection on the search set (random allocations, or a baseline's own
  hyperparameter), with K the number of plans HiPP's plan selection evaluates; not an allocator: the caller
  gives it a scorer (the plan evaluator).
- ``flap`` (FLAP, An et al. 2024) lives in its own module, registered by whoever imports it.

Imports ``allocators``, ``layer_counts``, ``plan`` and ``criteria`` of ``pruning``, never the planner.
"""

from worker.hipp.pruning.baselines import equal_budget, llm_pruner, owl, wanda_sp

__all__ = ["equal_budget", "llm_pruner", "owl", "wanda_sp"]
