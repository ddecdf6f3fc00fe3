"""Weight-only quantisation (int8 per output channel, grouped int4) of every family's matmul
weights and embeddings: core.py (one weight), model.py (a model: which weights, the module that
runs on them), files.py (a quantised run's safetensors). docs/quantization.md tells why this is
not built on qwix."""

from jaxft.quant.core import BITS, Layout, QArray, check_bits, dequantize, quantize
from jaxft.quant.files import WEIGHTS_FILE, is_quantized, load_variables, save_weights, weight_bytes
from jaxft.quant.model import (
           Dequantized,
           attach,
           dequantize_tree,
           layouts,
           quantize_params,
           quantize_run,
)

__all__ = ["BITS", "WEIGHTS_FILE", "Dequantized", "Layout", "QArray", "attach", "check_bits",
           "dequantize", "dequantize_tree", "is_quantized", "layouts", "load_variables",
           "quantize", "quantize_params", "quantize_run", "save_weights", "weight_bytes"]
