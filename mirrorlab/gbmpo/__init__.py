"""GBMPO: group-based mirror policy optimisation (DESIGN section 3).

Pure loss functions (`advantages`, `policy_loss`, `aggregate`, `gbmpo_loss`) and the trainer
(`GBMPOTrainer`, `build_trainer`) that runs them on a model and a task.
"""

from mirrorlab.gbmpo.losses import LossOutput, advantages, aggregate, gbmpo_loss, policy_loss
from mirrorlab.gbmpo.trainer import EvalResult, GBMPOTrainer, Rollout, build_divergence, build_trainer

__all__ = [
    "EvalResult", "GBMPOTrainer", "LossOutput", "Rollout", "advantages", "aggregate", "build_divergence",
    "build_trainer", "gbmpo_loss", "policy_loss",
]
