"""GPU kernels (Triton), each with a reference implementation beside it and a dispatch that uses
the reference wherever the kernel cannot run (CPU, no Triton, autograd). Imports nothing of ours."""
