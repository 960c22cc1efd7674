"""Merge the model being trained with a pool of exported models, and log the merge's accuracy and ASR.

    trainer:
      callbacks:
        - class_path: callbacks.merge_eval.MergeEvaluate
          init_args: {pool: [outputs/default/models/digits.safetensors], coefficients: [0.3], every_n_steps: 100}

Every ``every_n_steps`` (and at the end of fit) it writes the module's image encoder θ_now (with the module's
export metadata) to a temporary file, merges it with the pool through ``evaluation.merge_eval`` (the API merge.py
uses) on the val split (the first ``max_examples`` images per task), and logs to the trainer's logger

    merge/<method>/λ=<c>/acc/<task>, .../mean_acc                     clean accuracy of the merge
    merge/<method>/λ=<c>/asr/<trigger>, .../clean_to_target/<trigger>  every backdoored input's trigger

where the triggers are those of the backdoored inputs: the module itself when it injects a backdoor
(``BackdoorInjection``; trigger ``training``) and the pool's backdoored exports. So a user sees during training
whether what it learns survives merging.

IBVS: with ``ibvs_clean`` and ``ibvs_backdoored`` (the defender's own pair) it also evaluates θ_merged − α·BV_inj
for every α of ``ibvs_alphas`` and logs the same metrics under ``.../ibvs_α=<a>/``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import lightning as L

from defenses import defense_setting
from evaluation.merge_eval import EvalCache, MergeEvalRequest, PlanEntry, evaluate_merges, validate_plan_entry
from evaluation.rows import Row
from merging.io import save_state_dict


def row_metrics(rows: list[Row]) -> dict[str, float]:
    """Logger metrics of result rows: clean accuracy per task and mean, ASR and clean-to-target per trigger."""
    metrics = {}
    for row in rows:
        prefix = f"merge/{row.merge}" + ("" if row.coefficient is None else f"/λ={row.coefficient:g}")
        if row.defense_alpha is not None:
            prefix += f"/{row.defense}_α={row.defense_alpha:g}"
        if row.attack is None:
            metrics.update({f"{prefix}/acc/{t}": a for t, a in row.clean_acc.items()})
            metrics[f"{prefix}/mean_acc"] = row.mean_clean_acc
        else:
            metrics[f"{prefix}/asr/{row.attack.label}"] = row.asr
            metrics[f"{prefix}/clean_to_target/{row.attack.label}"] = row.clean_to_target
    return metrics


class MergeEvaluate(L.Callback):
    def __init__(self, pool: list[str], method: str = "task_arithmetic", coefficients: list[float] = [0.3],  # noqa: B006
                 hparams: dict | None = None, every_n_steps: int = 0, max_examples: int = 500,
                 cache_dir: str = ".cache/badmerging", ibvs_clean: str | None = None, ibvs_backdoored: str | None = None,
                 ibvs_alphas: list[float] = [1.0], device: str = "cpu"):  # noqa: B006
        super().__init__()
        if (ibvs_clean is None) != (ibvs_backdoored is None):
            raise ValueError("IBVS needs both ibvs_clean and ibvs_backdoored (the defender's clean and self-backdoored "
                             "fine-tunes); pass both or neither")
        self.pool = list(pool)
        self.entry = PlanEntry(method, coefficients=list(coefficients), hparams=dict(hparams or {}))
        validate_plan_entry(self.entry, len(self.pool) + 1)  # an unknown method or hyperparameter fails before training
        self.defenses = [] if ibvs_clean is None else [
            defense_setting("ibvs", {"clean": ibvs_clean, "backdoored": ibvs_backdoored}, list(ibvs_alphas), select=None)]
        self.every_n_steps, self.max_examples, self.cache_dir, self.device = every_n_steps, max_examples, cache_dir, device
        self.cache = EvalCache()  # θ_pre and decoded val data, reused by every evaluation
        self._tmp: tempfile.TemporaryDirectory | None = None
        self.history: list[dict] = []

    def _current_model(self, pl_module) -> str:
        """θ_now with the module's export metadata (task, base, attack), as a file the evaluation API reads."""
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="merge_eval_")
        path = Path(self._tmp.name) / "training.safetensors"
        state = {k: v.detach().cpu() for k, v in pl_module.encoder.state_dict().items()}
        save_state_dict(path, state, pl_module.export_metadata())
        return str(path)

    def _request(self, trainer: L.Trainer, pl_module, current: str) -> MergeEvalRequest:
        h = pl_module.hparams
        # the val split is held out of the fine-tune's own renders: take the data settings of the trainer's datamodule
        data = dict(getattr(trainer.datamodule, "hparams", None) or {}) if trainer.datamodule is not None else {}
        sizes = {k: data[k] for k in ("synthetic_train_size", "synthetic_test_size") if k in data}
        data_dirs = {pl_module.spec.name: data["data_dir"]} if data.get("data_dir") else {}
        return MergeEvalRequest(models=[current, *self.pool], plan=[self.entry], defenses=self.defenses, zero_shot=False,
                                individual=False, model_name=h.model_name, pretrained=h.pretrained, cache_dir=self.cache_dir,
                                data_dirs=data_dirs, device=self.device, val_max_examples=self.max_examples,
                                eval_split="val", **sizes)

    def evaluate(self, trainer: L.Trainer, pl_module) -> dict:
        request = self._request(trainer, pl_module, self._current_model(pl_module))
        metrics = row_metrics(evaluate_merges(request, self.cache).rows)
        if trainer.logger is not None:
            trainer.logger.log_metrics(metrics, step=trainer.global_step)
        self.history.append({"step": trainer.global_step, **metrics})
        return metrics

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and trainer.is_global_zero:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero and (not self.history or self.history[-1]["step"] != trainer.global_step):
            self.evaluate(trainer, pl_module)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
