"""Deployment helpers: building TensorRT engines and checking what they ran."""
