"""SALAD training (issue 8): trainable model, losses, data preparation, trainer.

CLI: ``python -m salad_core.train prepare|prepare-prompts|train ...`` (see __main__.py).
Everything that touches ComfyUI imports it inside functions.
"""

from .losses import distillation_loss, flow_matching_loss
from .model import DEFAULT_LORA_RANK, SaladTrainModel, load_wan_for_training, trainable_param_count
from .trainer import TrainConfig, Trainer, train

__all__ = [
    "DEFAULT_LORA_RANK", "SaladTrainModel", "TrainConfig", "Trainer", "distillation_loss",
    "flow_matching_loss", "load_wan_for_training", "train", "trainable_param_count",
]
