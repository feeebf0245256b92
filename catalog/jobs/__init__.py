"""The jobs that run the methods and write the store: `ingest` and `intervene`."""
