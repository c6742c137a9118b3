"""Object detection: annotated boxes, their model, metrics and data."""
