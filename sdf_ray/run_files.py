"""Names of the files sdf-ray keeps in a run directory (``<checkpoint.storage_path>/<run name>``)."""

RESOLVED_CONFIG_FILE = "config.yaml"  # the validated config the run was started with
SUMMARY_FILE = "summary.json"  # status, steps, skips, rollbacks, restarts, replica checksums
WORKER_GROUP_STARTS_FILE = ".worker-group-starts"  # rank 0 counts worker-group (re)starts per fit()
