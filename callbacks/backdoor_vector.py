"""Log the Backdoor Vector of the run being trained and its similarity to other BVs (docs/design.md §10).

    trainer:
      callbacks:
        - class_path: callbacks.backdoor_vector.BackdoorVectorMonitor
          init_args:
            clean_reference: outputs/bv/analysis/models/clean_shapes_s0.safetensors
            compare_to: {badnets_tl: outputs/bv/analysis/models/s0_tl_square.safetensors}

At the end of fit (and every ``every_n_steps``) it takes BV_now = θ_now − θ_clean (the run's image
encoder against its paired clean reference: same recipe and seed), and logs ``bv/norm``,
``bv/cosine/<name>`` = cos(BV_now, BV_name) with BV_name = θ_name − θ_clean for every ``compare_to``
export, and a heat-map figure ``bv/cosine`` over [this run, *compare_to] to the TensorBoard logger.
``history`` keeps every measurement. Use ``bv.py analyze`` for the full matrix, transfer and scaling.
"""

from __future__ import annotations

import lightning as L

from merging.backdoor_vectors import backdoor_vector, similarity_matrix
from merging.io import load_state_dict


class BackdoorVectorMonitor(L.Callback):
    def __init__(self, clean_reference: str, compare_to: dict[str, str] | None = None, every_n_steps: int = 0):
        super().__init__()
        self.clean_reference, self.compare_to, self.every_n_steps = clean_reference, dict(compare_to or {}), every_n_steps
        self._clean = None
        self._others: dict = {}
        self.history: list[dict] = []

    def _setup(self) -> None:
        self._clean = load_state_dict(self.clean_reference)
        self._others = {n: backdoor_vector(load_state_dict(p), self._clean) for n, p in self.compare_to.items()}

    def measure(self, trainer: L.Trainer, pl_module) -> dict:
        if self._clean is None:
            self._setup()
        state = {k: v.detach().cpu() for k, v in pl_module.encoder.state_dict().items()}
        bv = backdoor_vector(state, self._clean)
        names = ["this run", *self._others]
        matrix = similarity_matrix([bv, *self._others.values()])
        metrics = {"bv/norm": float(sum((v.double() ** 2).sum() for v in bv.values()) ** 0.5)}
        metrics.update({f"bv/cosine/{n}": float(matrix[0, i]) for i, n in enumerate(names[1:], start=1)})
        logger = trainer.logger
        if logger is not None:
            logger.log_metrics(metrics, step=trainer.global_step)
            experiment = getattr(logger, "experiment", None)
            if len(names) > 1 and hasattr(experiment, "add_figure"):
                from evaluation.figures import matrix_heatmap

                experiment.add_figure("bv/cosine", matrix_heatmap(matrix.tolist(), names, title="BV cosine"),
                                      global_step=trainer.global_step)
        self.history.append({"step": trainer.global_step, **metrics})
        return metrics

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0 and trainer.is_global_zero:
            self.measure(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero and (not self.history or self.history[-1]["step"] != trainer.global_step):
            self.measure(trainer, pl_module)
