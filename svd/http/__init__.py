"""The HTTP edge: middleware, the task and output routes, the published schema, the page."""
