"""Exports of a trained run for serving (ONNX)."""
