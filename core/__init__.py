"""Model, losses, metrics, optimisation, mixed precision, checkpoints and the train/eval engine."""
from core.blocks import ConvBNAct, fuse_for_inference
from core.model import DeepLabV3, build_model

__all__ = ["ConvBNAct", "DeepLabV3", "build_model", "fuse_for_inference"]
