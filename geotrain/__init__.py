"""geotrain: train one model across clouds, sites meeting rarely through object storage."""

__version__ = "0.1.0"
