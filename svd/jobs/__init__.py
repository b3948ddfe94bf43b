"""The job queue: the job model, the stores, the runner, fair turns, ETAs and the jobs' webhooks."""
