"""Pallas kernels for NVIDIA GPUs. This package never imports jaxserve: each kernel file holds the
kernel body, its `pallas_call` wrapper, a jitted public function and a pure-jnp `*_reference`."""
