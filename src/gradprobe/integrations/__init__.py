"""Adapters to where people train; nothing inside gradprobe imports them (except the CLI's ``export``).

* :mod:`gradprobe.integrations.lightning`: ``GradProbeCallback`` for ``lightning.Trainer`` (extra ``lightning``);
* :mod:`gradprobe.integrations.transformers`: ``GradProbeCallback`` for ``transformers.Trainer``
  (extra ``transformers``);
* :mod:`gradprobe.integrations.tensorboard`: ``TensorBoardSink``, live per-layer scalars, and
  ``export_tensorboard`` from a finished run log (extra ``tensorboard``).

Importing this package imports no framework; each module raises
:class:`~gradprobe.errors.MissingExtraError` naming the extra to install when its framework is missing.
"""
