"""A job's webhooks: the events it sends, the addresses it may call, and the senders."""
