"""Background jobs: APScheduler with its job store in the daemon's database."""
