"""Triton kernels of lungcore, installed as ``lungcore.triton_kernels``.

One file per op holds its ``@triton.jit`` kernels and their launch functions; nothing here
does autograd or dispatch (that is ``lungcore.ops``). Importing this package does not import
Triton; importing an op's module does. Set ``TRITON_INTERPRET=1`` *before* importing an op
module to run its kernels on CPU tensors (how CI proves them without a GPU).
"""
