"""The option values the command line offers, in a module that imports nothing heavy.

``onnxq --help`` builds its parser from these without importing numpy, onnx or ONNX Runtime, so it
answers at once. The modules that implement each choice import their names from here (modes, targets)
or are checked against them by the tests (calibration methods, memory default).
"""

from __future__ import annotations

#: quantization modes (number format of weights and activations)
MODES = ("int8", "fp8")
#: deployment targets, one placement rule set each in patterns/
TARGETS = ("tensorrt", "ort")
#: built-in calibration methods (onnxq.calibration.methods registers these names)
CALIB_METHODS = ("entropy", "max", "mse", "percentile")
DEFAULT_CALIB_METHOD = "max"
#: memory for the tensors one calibration run hands back, in MB
DEFAULT_CALIB_MEMORY_MB = 512
