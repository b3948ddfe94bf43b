"""Programs around the service: the batch client, the Python client fix, the GPU check. Nothing in svd imports them."""
