// scoremerge._cpu: scoremerge's CPU helpers, plain C++ (csrc/README.md). Each has a torch
// reference in the package, and scoremerge checks the two agree before it uses one.
#include "cpu.h"

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

namespace py = pybind11;
using namespace scoremerge_cpu;

PYBIND11_MODULE(_cpu, m) {
  m.doc() = "scoremerge's CPU helpers (csrc/cpu)";
  m.def("version", [] { return ABI_VERSION; });
  m.def("prefix_mask", &prefix_mask_py, py::arg("values"), py::arg("n"), py::arg("k"),
        py::arg("mask"), py::arg("depth") = -1);
  m.def("task_arithmetic", &task_arithmetic_py, py::arg("base"), py::arg("experts"),
        py::arg("weights"), py::arg("alpha"), py::arg("out"), py::arg("n"));
  m.def("linear", &linear_py, py::arg("experts"), py::arg("weights"), py::arg("divisor"),
        py::arg("out"), py::arg("n"));
  m.attr("OK") = int(OK);
  m.attr("HAS_NAN") = int(HAS_NAN);
  m.attr("TOO_DEEP") = int(TOO_DEEP);
}
