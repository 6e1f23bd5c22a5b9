"""torch.compile of each transformer block (its attention and its MLP), in place.

Why per block: the blocks of a ViT are alike, so the compiler traces one graph per input
shape and every block reuses it (compile time does not grow with depth), and the rest of
the model (patch embedding, PRR, the DINO head, the loss) stays eager. Why the attention
and the MLP rather than the whole block: they hold all the work (GAug, the biased
attention function, GELU), while the block's stochastic depth has a different rate in
every block, which the compiler would specialise on (a graph per block, past its
recompile limit). Why in place
(``nn.Module.compile``): the module tree and its ``state_dict`` keys are untouched, so a
checkpoint of a compiled model has no ``_orig_mod.`` prefixes and loads into an
uncompiled one (and :func:`strip_compile_prefix` takes care of files that have them).

Shapes are compiled static (``dynamic=False``): a DINO step sees two shapes (global and
local crops), an evaluation one or two (the last batch), and static graphs give the same
numbers on every run, which the resume guarantee needs.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from dino_locat.models.vision_transformer import Block

COMPILE_PREFIX = "_orig_mod."


def compile_blocks(model: nn.Module) -> int:
    """Compile every transformer block of ``model`` (a backbone, or anything holding
    backbones, such as the DINO student); returns how many blocks were compiled."""
    blocks = [module for module in model.modules() if isinstance(module, Block)]
    if not blocks:
        raise ValueError(f"--compile: {type(model).__name__} holds no transformer blocks")
    for block in blocks:
        block.attn.compile(dynamic=False)
        block.mlp.compile(dynamic=False)
    return len(blocks)


def strip_compile_prefix(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``state`` without the ``_orig_mod.`` that ``torch.compile(module)`` wrappers add to
    their keys (wherever in the key), so such files load into plain modules."""
    return {key.replace(COMPILE_PREFIX, ""): value for key, value in state.items()}
