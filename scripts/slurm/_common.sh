# Sourced by the sbatch templates in this folder (run from the repository root: sbatch --chdir <repo>).
# Sets PYTHON and RUN_ARGS: the train.py arguments that make a run's directories stable across
# requeues, so a requeued job writes to, and resumes from, the same place:
#   default_root_dir = logger save_dir = $RUN_ROOT/<job name>-<job id>   (array: <array job id>_<task id>)
#   TensorBoard version fixed to 0: <run dir>/<logger name>/version_0/{events, config.yaml, checkpoints/, encoder.safetensors}
#   hpc_ckpt_<n>.ckpt (Lightning's auto-requeue checkpoint) in <run dir>
# On a restart (SLURM_RESTART_COUNT > 0) it adds --ckpt_path last: train.py resumes from the newest of
# hpc_ckpt_*.ckpt and last.ckpt.
# Environment: PYTHON (default: python), RUN_ROOT (default: outputs/slurm).

PYTHON="${PYTHON:-python}"
RUN_ROOT="${RUN_ROOT:-outputs/slurm}"
if [ -n "${SLURM_ARRAY_JOB_ID:-}" ]; then
    RUN_ID="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
else
    RUN_ID="${SLURM_JOB_ID:?not inside a SLURM job: submit this script with sbatch}"
fi
RUN_DIR="${RUN_ROOT}/${SLURM_JOB_NAME:-train}-${RUN_ID}"
RESTARTS="${SLURM_RESTART_COUNT:-0}"
mkdir -p "$RUN_DIR"
RUN_ARGS=(--trainer.default_root_dir "$RUN_DIR"
          --trainer.logger.init_args.save_dir "$RUN_DIR"
          --trainer.logger.init_args.version 0)
if [ "$RESTARTS" -gt 0 ]; then
    RUN_ARGS+=(--ckpt_path last)
fi
echo "[$(date +%FT%T)] job ${RUN_ID} start ${RESTARTS} on ${SLURM_JOB_NODELIST:-?}: ${SLURM_NTASKS:-?} tasks, run dir ${RUN_DIR}"
