"""Shared by server and clients: example-set data, loaders, losses, metrics, models, config."""
