"""@njit CPU kernels, one file per op family. Kernels trust their inputs: the ops in
fastmoe_nb/ops validate and allocate before calling them."""
