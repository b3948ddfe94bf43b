"""The bottom layer: settings, ids, retention, errors, the generation controls and progress.

It imports nothing of svd above it."""
