"""Exporter (``derm.exporter``): TFLite, ONNX and Core ML files with the aggregation matrix baked in.

Needs the ``[export]`` extra. Not implemented yet: see issue #4.
"""
