// The batched eigensolver's bindings (eigh.cu), registered into scoremerge._C by bindings.cu.
#pragma once

#include <pybind11/pybind11.h>

void register_eigh(pybind11::module_& m);
