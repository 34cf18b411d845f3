"""lamina on Ray: `LaminaPredictor` for Ray Data pipelines, and `lamina batch --ray`.

Ray is an optional extra (`pip install 'lamina[ray]'`); only this package imports it.
"""

from engine.distributed.predictor import LaminaPredictor

__all__ = ["LaminaPredictor"]
