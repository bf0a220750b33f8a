"""The HiPP-Prune policy: state features of a model (``state``), the hierarchical preference-conditioned
network (``network``), plan-level GRPO (``grpo``), plan search and policy training (``search``), the SynFlow
stability proxy (``stability``), and the policy store with the shipped policies (``store``, ``shipped/``).

Imports ``models``, ``data``, ``pruning``, ``evaluation`` and ``sensitivity``.
"""
