// placeholder replaced by the C++ backend
#include <pybind11/pybind11.h>
PYBIND11_MODULE(_C, m) { m.doc() = "salm_fast C++ CPU kernels"; }
