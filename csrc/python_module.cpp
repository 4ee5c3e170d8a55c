// An empty Python module, so that `import crelu_ext._C` loads the library and
// runs its TORCH_LIBRARY registrations. The ops are reached through
// torch.ops.crelu_ext; no pybind11 is needed (and none keeps the ABI stable).
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr,
                                          -1, nullptr};
  return PyModule_Create(&module_def);
}
}
