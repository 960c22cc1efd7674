"""Models: open_clip by name, the embedded base model (and its pre-training), zero-shot heads, the code version.

Floor: the bottom, above ``merging`` (safetensors I/O) and ``datamodules`` (``modeling.pretrain`` trains
on the synthetic renders); nothing higher (tests/test_layers.py).
"""
