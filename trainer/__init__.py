"""Trainer (``derm.trainer``): fine-tunes ImageNet-pretrained Inception-v3 on the partitioned training classes.

Needs the ``[train]`` extra (TensorFlow). Not implemented yet: see issue #3.
"""
