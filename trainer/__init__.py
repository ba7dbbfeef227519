"""Trainer (``derm.trainer``): fine-tunes ImageNet-pretrained Inception-v3 on the partitioned training classes.

Needs the ``[train]`` extra (TensorFlow). ``derm train`` is its command line (:mod:`derm.trainer.cli`),
:class:`derm.trainer.config.TrainConfig` every option of a run, :func:`derm.trainer.train.train` the run itself
(a head on cached features, optionally the top blocks on cached activations, or every layer), and
:mod:`derm.trainer.rundir` the one owner of the run directory it writes.
"""
