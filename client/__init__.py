"""The device side: Flower ClientApp, local student trainer, export and on-device scoring."""
