// The Python module fastmlp._C is empty: importing it loads this library, whose static
// initialisers register the ops (TORCH_LIBRARY blocks) with the dispatcher.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
