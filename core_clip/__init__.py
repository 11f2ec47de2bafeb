"""core_clip: train and serve CLIP dual encoders (architectures, tokenizers and pretrained weights from open_clip)."""
from .startup import paused_gc

with paused_gc():   # torch and open_clip import about a second faster without the cyclic collector (see .startup)
    from .errors import (CheckpointError, CoreClipError, DataError, ImageReadError, ModelNotFoundError,
                         WeightsUnavailableError)
    from .model import DEFAULT_MODEL, ClipModel, ModelConfig, list_configs, list_shipped, load
    from .retrieval import EmbeddingIndex, recall_at_k, top_k
    from .score import clip_score
    from .zeroshot import ZeroShotClassifier

__all__ = [
    "CheckpointError", "ClipModel", "CoreClipError", "DEFAULT_MODEL", "DataError", "EmbeddingIndex",
    "ImageReadError", "ModelConfig", "ModelNotFoundError", "WeightsUnavailableError", "ZeroShotClassifier",
    "clip_score", "list_configs", "list_shipped", "load", "recall_at_k", "top_k",
]
