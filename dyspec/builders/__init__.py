"""Tree builders behind one interface (`TreeBuilder.build(oracle, budget, coins)`)."""
from dyspec.builders.base import DraftOracle, TreeBuilder
from dyspec.builders.best_first import BestFirstBuilder
from dyspec.builders.chain import ChainBuilder
from dyspec.builders.dyspec_heap import DySpecBuilder
from dyspec.builders.dyspec_layer import DySpecLayerBuilder
from dyspec.builders.sequoia import SequoiaBuilder, sequoia_shape
from dyspec.builders.specinfer import SpecInferBuilder

BUILDERS: dict[str, type[TreeBuilder]] = {
    b.name: b for b in (DySpecBuilder, DySpecLayerBuilder, BestFirstBuilder, SequoiaBuilder, SpecInferBuilder, ChainBuilder)
}


def make_builder(method: str, **options) -> TreeBuilder:
    """A builder by method name; unknown names raise ValueError listing the valid ones."""
    try:
        cls = BUILDERS[method]
    except KeyError:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(BUILDERS)}") from None
    return cls(**options)


__all__ = ["BUILDERS", "DraftOracle", "TreeBuilder", "make_builder", "sequoia_shape",
           "BestFirstBuilder", "ChainBuilder", "DySpecBuilder", "DySpecLayerBuilder", "SequoiaBuilder", "SpecInferBuilder"]
