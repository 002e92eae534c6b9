"""GBMPO: group-based mirror policy optimisation (DESIGN section 3).

Pure loss functions (`advantages`, `policy_loss`, `aggregate`, `gbmpo_loss`), the trainer
(`GBMPOTrainer`, `build_trainer`) that runs them on a model and a task, and the generation
backends behind `mirrorlab.rollouts.RolloutBackend` (`rollout_fast`, `rollout_hf`, `rollout_vllm`).
"""

from mirrorlab.gbmpo.losses import (
    BatchTotals,
    LossOutput,
    LossSpec,
    advantages,
    aggregate,
    gbmpo_loss,
    penalised_rewards,
    policy_loss,
)
from mirrorlab.gbmpo.trainer import (
    EvalResult,
    GBMPOTrainer,
    Regulariser,
    Rollout,
    build_trainer,
    sample_tables,
)

__all__ = [
    "BatchTotals", "EvalResult", "GBMPOTrainer", "LossOutput", "LossSpec", "Regulariser", "Rollout",
    "advantages", "aggregate",
    "build_trainer", "gbmpo_loss", "penalised_rewards", "policy_loss", "sample_tables",
]
