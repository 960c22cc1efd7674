"""Data: the task registry and task files (YAML), hub/local loading, the synthetic suite, triggers and datamodules.

Floor: the bottom, above ``merging`` only (safetensors I/O); never ``modeling`` (which imports this
package: the base model is pre-trained on its renders) or anything higher (tests/test_layers.py).
"""

from datamodules.synthetic import register_synthetic_tasks

register_synthetic_tasks()
