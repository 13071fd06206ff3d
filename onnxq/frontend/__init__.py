"""The PyTorch front-end: ``onnxq export`` and ``onnxq.export`` (needs ``pip install 'onnxq[torch]'``).

Modules: ``recipes`` (the ``models/*.toml`` recipes and the hints they leave in exported models),
``builders`` (modules and example inputs per family), ``weights`` (local weight files), ``export``
(the export itself), ``calibration`` (calibration samples), ``cli_export`` (the command). Nothing here
imports torch until an export runs, so onnxq without torch still imports and quantizes.
"""
