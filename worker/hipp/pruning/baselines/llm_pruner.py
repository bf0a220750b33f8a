"""The practitioners' convention from LLM-Pruner (Ma et al. 2023): the first and last layers stay dense, every
other layer is pruned at the same ratio, heads and channels alike.

LLM-Pruner's LLaMA-7B recipe prunes layers 4-29 of 32 (``--block_attention_layer_start 4
--block_attention_layer_end 30`` and the same for the MLP): 4 first and 2 last layers dense. On a model of depth
``L`` that is ``round(4 L / 32)`` first and ``round(2 L / 32)`` last (depth 6: 1 and 0), or the counts given to
the constructor. The ratio over the pruned layers is what meets the global sparsity; heads and channels get it
alike (``wanda_sp.equal_split_counts``), and the MLP-width correction that keeps the budget exact never touches
the protected layers.

Imports ``allocators``, ``layer_counts`` and ``baselines.wanda_sp``.
"""

from __future__ import annotations

from worker.hipp.errors import OptionError
from worker.hipp.pruning.allocators import ALLOCATORS, AllocationContext, Allocator
from worker.hipp.pruning.baselines.wanda_sp import equal_split_counts
from worker.hipp.pruning.layer_counts import LayerCounts
from worker.hipp.pruning.plan import ModelGeometry, dense_layer_parameters

LLAMA_DEPTH, LLAMA_FIRST, LLAMA_LAST = 32, 4, 2


def protected_layers(depth: int, first: int | None = None, last: int | None = None) -> tuple[int, int]:
    """(dense first layers, dense last layers): LLaMA-7B's 4 and 2 of 32 scaled to ``depth`` unless given."""
    first = round(LLAMA_FIRST * depth / LLAMA_DEPTH) if first is None else first
    last = round(LLAMA_LAST * depth / LLAMA_DEPTH) if last is None else last
    if first < 0 or last < 0 or first + last >= depth:
        raise OptionError(f"cannot keep {first} first and {last} last layers dense in a {depth}-layer model")
    return first, last


@ALLOCATORS.register("llm-pruner")
class LLMPrunerAllocator(Allocator):
    """``first`` / ``last``: dense layers at each end (default: LLaMA-7B's 4 / 2 of 32 scaled to the depth)."""

    def __init__(self, first: int | None = None, last: int | None = None) -> None:
        self.first = first
        self.last = last

    @classmethod
    def protecting(cls, total: int) -> LLMPrunerAllocator:
        """``total`` dense layers split as LLaMA-7B's recipe does, two at the start for one at the end."""
        first = round(total * LLAMA_FIRST / (LLAMA_FIRST + LLAMA_LAST))
        return cls(first, total - first)

    def layer_ratios(self, geometry: ModelGeometry, sparsity: float, context: AllocationContext) -> list[float]:
        first, last = protected_layers(geometry.num_layers, self.first, self.last)
        dense = [dense_layer_parameters(s, geometry.hidden_size) for s in geometry.layers]
        pruned = range(first, geometry.num_layers - last)
        ratio = sparsity * sum(dense) / sum(dense[i] for i in pruned)
        if ratio >= 1.0:
            raise OptionError(f"sparsity {sparsity} needs {ratio:.2f} of the {len(pruned)} unprotected layers")
        return [ratio if i in pruned else 0.0 for i in range(geometry.num_layers)]

    def layer_counts(
        self, geometry: ModelGeometry, sparsity: float, context: AllocationContext, mlp_multiple: int
    ) -> list[LayerCounts]:
        first, last = protected_layers(geometry.num_layers, self.first, self.last)
        frozen = set(range(first)) | set(range(geometry.num_layers - last, geometry.num_layers))
        ratios = self.layer_ratios(geometry, sparsity, context)
        return equal_split_counts(geometry, ratios, sparsity, mlp_multiple, context.scores, frozen)
