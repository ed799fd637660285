"""Public ops: validate, pick the backend, allocate, call the kernels."""
