"""The job queue: the job model, webhook events, the stores, the runner and the webhook delivery."""
