// mmattn._C: operator schemas and the Python module entry point.
//
// The module is built against the PyTorch stable ABI and Py_LIMITED_API, so a
// single abi3 wheel loads into every CPython >= 3.10 and torch >= 2.10. Kernels
// register themselves per device in csrc/cpu/*.cpp and csrc/cuda/*.cu.
#include <Python.h>

#include "stable_utils.h"

STABLE_TORCH_LIBRARY(mmattn, m) {
  // Philox4x32-10 uniforms for dropout; see csrc/philox.h for the definition.
  // counter0/counter1/counter2: int32 tensors of one shape (counter2 None = 0);
  // returns float32 of that shape.
  m.def("philox_uniform(Tensor counter0, Tensor counter1, int seed, Tensor? counter2=None) "
        "-> Tensor");
}

extern "C" {
// Importing the module only needs to run the static registrations above.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "mmattn compiled kernels (stable ABI)", -1, nullptr,
      nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}
}
