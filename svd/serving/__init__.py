"""The model's life in a worker: the engine, the GPU's turns, records, metrics, the hub model."""
