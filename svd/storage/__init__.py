"""What the service keeps, in a folder or a bucket: the kept outputs and the running jobs' previews."""
