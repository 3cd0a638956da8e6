"""Functional meta-learners (MAML, first-order MAML, ANIL, ProtoNet), tasks and meta-batch losses."""

from dfml.meta.batched import batch_norm_from_primitives, meta_batch_loss
from dfml.meta.learners import (
    ANIL,
    LEARNER_NAMES,
    MAML,
    Learner,
    ProtoNet,
    backbone_features,
    build_learner,
    functorch_inner_gradients,
)
from dfml.meta.tasks import Task, TaskBatch, check_task_shapes, infer_n_way, stack_tasks

__all__ = [
    "ANIL",
    "LEARNER_NAMES",
    "MAML",
    "Learner",
    "ProtoNet",
    "Task",
    "TaskBatch",
    "backbone_features",
    "batch_norm_from_primitives",
    "build_learner",
    "check_task_shapes",
    "functorch_inner_gradients",
    "infer_n_way",
    "meta_batch_loss",
    "stack_tasks",
]
