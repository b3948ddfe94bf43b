"""What the service keeps on disk: the kept outputs and the running jobs' previews."""
