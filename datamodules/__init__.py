"""Data: the task registry, hub/local loading, the synthetic suite, triggers and datamodules."""

from datamodules.synthetic import register_synthetic_tasks

register_synthetic_tasks()
