"""Exporter (``derm.exporter``): TFLite, ONNX and Core ML files with the aggregation matrix baked in, quantized,
self-describing (one manifest in every file) and checked against the Keras model. Needs the ``[export]`` extra;
``derm-export`` is its command line, :data:`derm.exporter.targets.TARGETS` its one table of targets.
"""
