"""Training of learned routers: `train_router(TrainConfig(...))`, behind `hf-subtok train-router`.

Needs peft for the LoRA part (`pip install 'hf-subtok[train]'`).
"""

from hf_subtok.training.evaluate import EvalConfig, evaluate
from hf_subtok.training.loop import TrainConfig, train_router
from hf_subtok.training.topk import straight_through_topk

__all__ = ["EvalConfig", "TrainConfig", "evaluate", "straight_through_topk", "train_router"]
