"""Pure-torch model merging on state dicts: safetensors IO, task vectors, merge methods, streaming engine.

Nothing here imports Lightning or the rest of the project.
"""

from .io import (
    MergeInputError,
    SafetensorsReader,
    load_metadata,
    load_state_dict,
    metadata_path,
    open_state_dict,
    read_header_metadata,
    save_state_dict,
)
from .methods import (
    MERGE_METHODS,
    breadcrumbs,
    build_plan,
    consensus,
    dare,
    get_merge_method,
    method_hyperparameters,
    task_arithmetic,
    ties_merge,
    validate_vectors,
    weight_average,
)
from .streaming import merge_files, validate_inputs
from .task_vectors import add_vector, is_mergeable, task_vector

__all__ = [
    "MERGE_METHODS",
    "MergeInputError",
    "SafetensorsReader",
    "add_vector",
    "breadcrumbs",
    "build_plan",
    "consensus",
    "dare",
    "get_merge_method",
    "is_mergeable",
    "load_metadata",
    "load_state_dict",
    "merge_files",
    "metadata_path",
    "method_hyperparameters",
    "open_state_dict",
    "read_header_metadata",
    "save_state_dict",
    "task_arithmetic",
    "task_vector",
    "ties_merge",
    "validate_inputs",
    "validate_vectors",
    "weight_average",
]
