"""What only tests use: ``emulated``, the CUDA kernels run on the host."""
