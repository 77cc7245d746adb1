// An empty Python module, so that `from sparse_adapt import _C` loads this library and runs its op
// registrations. Kept apart from the ops so that CMake targets (C++ tests, benchmarks) reuse them without Python.

#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      NULL,  // docstring
      -1,    // per-interpreter state size
      NULL,  // methods
  };
  return PyModule_Create(&module_def);
}
}
