"""The experiment engine: specs, one cached job graph, executors (local, SLURM via submitit), the CLI helper."""
