"""The CUDA backend: kernels generated with llvmlite for NVPTX (and, from the same IR
bodies, for the host CPU), devices that run them (`HostDevice`, `CudaDevice` through the
optional `cuda-bindings`), and the offloaded layers (`GpuLayers`, `forward_offloaded`).

Importing this package does not import `cuda-bindings`; a `CudaDevice` does, when made.
"""
