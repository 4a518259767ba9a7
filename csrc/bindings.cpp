// Module init of lungcore._C: runs every block registered with LUNGCORE_BINDINGS.
#include "bindings.h"

#ifdef _OPENMP
#include <omp.h>
#endif

PYBIND11_MODULE(_C, m) {
    m.doc() = "lungcore C++ CPU core (pybind11, numpy buffer protocol; no libtorch)";
    m.def("openmp_threads", []() {
#ifdef _OPENMP
        return omp_get_max_threads();
#else
        return 1;
#endif
    }, "Number of OpenMP threads the C++ kernels use (1 when built without OpenMP).");
    pybind11::list names;
    for (auto& entry : lungcore::binders()) {
        entry.second(m);
        names.append(entry.first);
    }
    m.attr("registered") = names;
}
