// Makes the shared library importable as `pyzsl._C`; importing it runs the TORCH_LIBRARY registrations.
// Only setup.py compiles this file; the CMake build is a plain C++ library loaded with torch.ops.load_library.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
