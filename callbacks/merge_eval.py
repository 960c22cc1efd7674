"""Merge the model being trained with a pool of exported models, and log the merge's accuracy.

    trainer:
      callbacks:
        - class_path: callbacks.merge_eval.MergeEvaluate
          init_args: {pool: [outputs/default/models/digits.safetensors], coefficients: [0.3], every_n_steps: 100}

Every ``every_n_steps`` (and at the end of fit) it takes τ_now = θ_now − θ_pre of the module's image
encoder, merges [τ_now, τ_pool...] with ``method``, evaluates clean accuracy on the tasks of the
module and of the pool, and logs ``merge/<method>/λ=<c>/acc/<task>`` and ``.../mean_acc`` to the
trainer's logger. So a user sees during training whether what it learns survives merging (the attack
issues add ASR here).

IBVS (DESIGN §10): with ``ibvs_clean`` and ``ibvs_backdoored`` (the defender's own pair) it also evaluates
θ_merged − α·BV_inj for every α of ``ibvs_alphas`` and logs ``.../ibvs_α=<a>/acc/<task>`` and ``.../mean_acc``.
"""

from __future__ import annotations

import copy

import lightning as L

from merging.io import load_metadata, load_state_dict
from merging.methods import get_merge_method, method_hyperparameters
from merging.task_vectors import task_vector


class MergeEvaluate(L.Callback):
    def __init__(self, pool: list[str], method: str = "task_arithmetic", coefficients: list[float] = [0.3],  # noqa: B006
                 hparams: dict | None = None, every_n_steps: int = 0, max_examples: int = 500,
                 cache_dir: str = ".cache/badmerging", ibvs_clean: str | None = None, ibvs_backdoored: str | None = None,
                 ibvs_alphas: list[float] = [1.0]):  # noqa: B006
        super().__init__()
        if (ibvs_clean is None) != (ibvs_backdoored is None):
            raise ValueError("IBVS needs both ibvs_clean and ibvs_backdoored (the defender's clean and self-backdoored "
                             "fine-tunes); pass both or neither")
        self.ibvs_paths, self.ibvs_alphas = (ibvs_clean, ibvs_backdoored), list(ibvs_alphas)
        self.bv_inj = None
        self.pool, self.method, self.coefficients = list(pool), method, list(coefficients)
        self.hparams = {**method_hyperparameters(method), **(hparams or {})}
        self.merge_fn = get_merge_method(method)
        self.every_n_steps, self.max_examples, self.cache_dir = every_n_steps, max_examples, cache_dir
        self._ready = False
        self.history: list[dict] = []

    def _setup(self, pl_module) -> None:
        from evaluation.evaluate import load_eval_tasks
        from modeling.clip import load_base_model

        h = pl_module.hparams
        self.base = load_base_model(h.model_name, h.pretrained)
        self.theta_pre = self.base.encoder_state_dict()
        tasks = [pl_module.spec.name]
        self.pool_vectors = []
        for p in self.pool:
            meta = load_metadata(p) or {}
            if meta.get("task"):
                tasks.append(meta["task"])
            self.pool_vectors.append(task_vector(load_state_dict(p), self.theta_pre))
        if self.ibvs_paths[0]:
            from merging.backdoor_vectors import backdoor_vector

            self.bv_inj = backdoor_vector(load_state_dict(self.ibvs_paths[1]), load_state_dict(self.ibvs_paths[0]))
        self.data = load_eval_tasks(list(dict.fromkeys(tasks)), self.base, split="val", cache_dir=self.cache_dir,
                                    max_examples=self.max_examples)
        self._ready = True

    def evaluate(self, trainer: L.Trainer, pl_module) -> dict:
        from evaluation.evaluate import evaluate_encoder

        if not self._ready:
            self._setup(pl_module)
        encoder = copy.deepcopy(pl_module.encoder).cpu().eval()
        current = task_vector({k: v.detach().cpu() for k, v in encoder.state_dict().items()}, self.theta_pre)
        metrics = {}
        for c in self.coefficients:
            hp = {**self.hparams, "coefficient": c} if "coefficient" in self.hparams else self.hparams
            merged = self.merge_fn(self.theta_pre, [current, *self.pool_vectors], **hp)
            variants = [(f"merge/{self.method}/λ={c:g}", merged)]
            if self.bv_inj is not None:
                from merging.backdoor_vectors import ibvs_defend

                variants += [(f"merge/{self.method}/λ={c:g}/ibvs_α={a:g}", ibvs_defend(merged, self.bv_inj, a))
                             for a in self.ibvs_alphas]
            for prefix, state in variants:
                encoder.load_state_dict(state)
                accs = evaluate_encoder(encoder, self.data)
                metrics.update({f"{prefix}/acc/{t}": a for t, a in accs.items()})
                metrics[f"{prefix}/mean_acc"] = sum(accs.values()) / len(accs)
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
