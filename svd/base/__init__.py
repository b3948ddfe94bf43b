"""The bottom layer: settings, ids, retention, errors, the generation controls and progress; imports nothing of svd above it."""
