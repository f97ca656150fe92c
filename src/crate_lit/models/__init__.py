"""CRATE, CRATE-alpha and CRATE-MAE as plain PyTorch modules; importing registers the
classifiers in timm."""

from .crate import Crate, CrateBlock, IstaBlock, LayerTrace, SubspaceAttention, WhiteboxTrace
from .crate_alpha import CrateAlpha, CrateAlphaBlock, OvercompleteIstaBlock
from .crate_mae import CrateMAE, CrateMAEClassifier
from .factory import (
    MODEL_NAMES,
    CheckpointMismatchError,
    LoadResult,
    create_model,
    load_pretrained,
    to_released_state_dict,
)

__all__ = [
    "Crate",
    "CrateAlpha",
    "CrateAlphaBlock",
    "CrateBlock",
    "CrateMAE",
    "CrateMAEClassifier",
    "CheckpointMismatchError",
    "IstaBlock",
    "LayerTrace",
    "LoadResult",
    "MODEL_NAMES",
    "OvercompleteIstaBlock",
    "SubspaceAttention",
    "WhiteboxTrace",
    "create_model",
    "load_pretrained",
    "to_released_state_dict",
]
