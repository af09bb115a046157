"""Weight quantization: RTN and AWQ quantizers, packed linears and their kernels, the on-disk
store of quantized weights."""
