"""Names of the files sdf-ray keeps in a run directory (``<checkpoint.storage_path>/<run name>``) and in a sweep
directory (``<checkpoint.storage_path>/<sweep name>``). Ray-free: the plots read them without importing Tune."""

RESOLVED_CONFIG_FILE = "config.yaml"  # the validated config the run was started with
SUMMARY_FILE = "summary.json"  # status, steps, skips, rollbacks, restarts, replica checksums
WORKER_GROUP_STARTS_FILE = ".worker-group-starts"  # rank 0 counts worker-group (re)starts per fit()

# A sweep directory (tuning/sweep.py and tuning/outputs.py write it; sdf_ray/plots.py reads it)
SWEEP_FILE = "sweep.yaml"  # the base config and search, to refuse resuming a different sweep
TRIALS_SUBDIR = "trials"  # one run directory per trial
TRIALS_CSV = "trials.csv"  # one row per trial
BEST_CONFIG = "best_config.yaml"
SWEEP_SUMMARY_FILE = "tune_summary.json"
