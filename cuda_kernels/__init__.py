"""CUDA C++ kernels of lungcore launched through CuPy, installed as ``lungcore.cuda_kernels``.

The sibling of ``lungcore.triton_kernels``: one file per op holds the launchers (compile through
NVRTC, size the grid, pass the arguments, count the launch); the CUDA sources themselves live in
``csrc/cuda`` (shipped as ``lungcore._cuda``). Nothing here does autograd or dispatch (that is
``lungcore.ops``). Importing this package imports neither CuPy nor torch.cuda.
"""
