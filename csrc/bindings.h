// Self-registration of Python bindings for lungcore._C.
//
// Each csrc/**/*.cpp file that exposes functions writes
//
//     LUNGCORE_BINDINGS(concordance) {
//         m.def("concordance_counts", &concordance_counts, ...);
//     }
//
// and the module init (bindings.cpp) runs every registered block. Static initialisers of one
// shared object run at load time, before PYBIND11_MODULE's init, so no shared list is edited
// when an op is added.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <functional>
#include <string>
#include <utility>
#include <vector>

namespace lungcore {

using Binder = void (*)(pybind11::module_&);

inline std::vector<std::pair<std::string, Binder>>& binders() {
    static std::vector<std::pair<std::string, Binder>> registry;
    return registry;
}

struct RegisterBindings {
    RegisterBindings(const char* name, Binder fn) { binders().emplace_back(name, fn); }
};

// A 1-D contiguous view of a numpy array of dtype T (forcecast: the caller validated values).
template <typename T>
using Array1d = pybind11::array_t<T, pybind11::array::c_style | pybind11::array::forcecast>;

}  // namespace lungcore

#define LUNGCORE_BINDINGS(name)                                                          \
    static void lungcore_bind_##name(pybind11::module_& m);                              \
    static ::lungcore::RegisterBindings lungcore_register_##name(#name, &lungcore_bind_##name); \
    static void lungcore_bind_##name(pybind11::module_& m)
