"""The pack's ComfyUI nodes (V3 API), one module per node family. Imported relatively by the
pack's top-level ``__init__.py`` (ComfyUI owns the top-level name ``nodes``)."""

from .apply import SaladApply
from .calibrate import SaladCalibrate
from .stats import SaladStats
from .train import SaladTrain
from .weights import SaladWeightsLoader

NODE_LIST = [SaladApply, SaladWeightsLoader, SaladStats, SaladCalibrate, SaladTrain]

__all__ = ["NODE_LIST", "SaladApply", "SaladCalibrate", "SaladStats", "SaladTrain", "SaladWeightsLoader"]
