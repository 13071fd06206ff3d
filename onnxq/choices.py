"""The option values the command line offers, in a module that imports nothing heavy.

``onnxq --help`` builds its parser from these without importing numpy, onnx or ONNX Runtime, so it
answers at once. The modules that implement each choice import their names from here (modes, targets)
or are checked against them by the tests (calibration methods, memory default).
"""

from __future__ import annotations

#: quantization modes (number formats of weights and activations; see onnxq.modes for each one)
MODES = ("int8", "fp8", "int4", "nvfp4", "nvfp4-w4a16", "w4a8", "int4-w4a8", "mxfp8")
#: weight algorithms for the INT4 modes (AWQ needs calibration data; rtn does not)
ALGORITHMS = ("rtn", "awq-lite", "awq-clip", "awq-full")
#: the default INT4 weight algorithm when calibration data is given (see README, "Block formats")
DEFAULT_ALGORITHM = "awq-full"
#: INT4 block size along the reduction axis
DEFAULT_INT4_BLOCK_SIZE = 128
#: deployment targets, one placement rule set each in patterns/
TARGETS = ("tensorrt", "ort")
#: built-in calibration methods (onnxq.calibration.methods registers all but auto, which measures them)
CALIB_METHODS = ("auto", "entropy", "max", "mse", "percentile")
#: every built-in method measured on a few calibration samples, the best kept (calibration/auto_method.py)
DEFAULT_CALIB_METHOD = "auto"
#: memory for the tensors one calibration run hands back, in MB
DEFAULT_CALIB_MEMORY_MB = 512
#: AutoQuantize: the formats each layer may take (modes, and fp16: the layer stays in the high-precision rest)
DEFAULT_AUTO_FORMATS = ("fp8", "int8", "nvfp4", "int4", "fp16")
#: SmoothQuant's alpha for a bare ``--smoothquant`` (measured: tools/results/bench_smoothquant.md)
DEFAULT_SMOOTHQUANT_ALPHA = 0.5
