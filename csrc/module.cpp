// The Python module moe_parallel._C: empty. Importing it loads this shared library, whose
// static TORCH_LIBRARY initializers register the ops under torch.ops.moe_parallel.
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",     // m_name
      nullptr,  // m_doc
      -1,       // m_size
      nullptr,  // m_methods
  };
  return PyModule_Create(&module_def);
}
}
