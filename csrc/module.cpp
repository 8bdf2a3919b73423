// The Python module bnas_fast._C. Importing it loads this shared library, whose static
// TORCH_LIBRARY_IMPL blocks register the CPU kernels with the dispatcher; the module itself exports
// nothing. A bare PyInit (no pybind11) keeps `import bnas_fast` fast.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",
      "bnas_fast CPU kernels, registered with torch.library on import",
      -1,
      nullptr,
  };
  return PyModule_Create(&module_def);
}
}
