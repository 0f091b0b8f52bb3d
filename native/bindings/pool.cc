// StagingPool: the page-aligned host arena with a first-fit allocator, and its views.

#include <pybind11/pybind11.h>

#include <memory>

#include "bindings.h"
#include "recoverkit/staging_pool.h"

namespace rkpy {
namespace {

using recoverkit::Arena;
using recoverkit::StagingPool;

// What a memoryview from StagingPool.view exports: it holds the arena, so the bytes stay
// valid even if the pool is closed while the view is alive.
struct PoolView {
  std::shared_ptr<Arena> arena;
  uint8_t* ptr;
  size_t len;
};

}  // namespace

void bind_pool(py::module_& m) {
  py::class_<PoolView>(m, "_PoolView", py::buffer_protocol())
      .def_buffer([](PoolView& v) {
        return py::buffer_info(v.ptr, 1, "B", 1, {static_cast<py::ssize_t>(v.len)}, {1}, false);
      });

  py::class_<StagingPool>(m, "StagingPool", R"doc(
One page-aligned host arena, allocated once; ranges are handed out by offset (first-fit over
a free list sorted by offset) and freed out of order with coalescing.

Example:
    >>> with StagingPool(1 << 20) as pool:
    ...     off = pool.alloc(100)
    ...     pool.view(off, 100)[:3] = b"abc"
    ...     pool.free(off)
)doc")
      .def(py::init([](const py::object& capacity_arg, const py::object& alignment_arg,
                       bool lock_memory, bool register_cuda) {
             const int64_t capacity_bytes = int_arg(capacity_arg, "capacity_bytes");
             if (capacity_bytes <= 0) throw py::value_error("capacity_bytes must be positive");
             const int64_t alignment = size_arg(alignment_arg, "alignment");
             py::gil_scoped_release release;  // mmap + mlock of a large arena takes a while
             return std::make_unique<StagingPool>(static_cast<size_t>(capacity_bytes),
                                                  static_cast<size_t>(alignment), lock_memory,
                                                  register_cuda);
           }),
           py::arg("capacity_bytes"), py::kw_only(), py::arg("alignment") = 4096,
           py::arg("lock_memory") = false, py::arg("register_cuda") = true)
      .def("alloc",
           [](StagingPool& p, const py::object& nbytes) { return p.alloc(size_arg(nbytes, "nbytes")); },
           py::arg("nbytes"), "Offset of a free range of round_up(max(nbytes, 1), alignment) bytes.")
      .def("free", [](StagingPool& p, const py::object& offset) { p.free(size_arg(offset, "offset")); },
           py::arg("offset"), "Returns the range at `offset` to the free list.")
      .def("address",
           [](StagingPool& p, const py::object& offset) { return p.address(size_arg(offset, "offset")); },
           py::arg("offset"), "The memory address of `offset`.")
      .def(
          "view",
          [](StagingPool& p, const py::object& offset_arg, const py::object& nbytes_arg) {
            const int64_t offset = size_arg(offset_arg, "offset"), nbytes = size_arg(nbytes_arg, "nbytes");
            auto arena = p.arena_for(static_cast<size_t>(offset), static_cast<size_t>(nbytes));
            PoolView v{arena, arena->data() + offset, static_cast<size_t>(nbytes)};
            return py::memoryview(py::cast(std::move(v)));
          },
          py::arg("offset"), py::arg("nbytes"),
          "A writable memoryview of [offset, offset + nbytes) that keeps the arena alive.")
      .def("close", &StagingPool::close, py::call_guard<py::gil_scoped_release>(),
           "Unregisters and releases the arena (idempotent).")
      .def("__enter__", [](py::object self) { return self; })
      .def("__exit__", [](StagingPool& p, const py::args&) { p.close(); })
      .def_property_readonly("capacity", [](const StagingPool& p) { return p.stats().capacity; })
      .def_property_readonly("used", [](const StagingPool& p) { return p.stats().used; })
      .def_property_readonly("high_water", [](const StagingPool& p) { return p.stats().high_water; })
      .def_property_readonly("alignment", [](const StagingPool& p) { return p.stats().alignment; })
      .def_property_readonly("locked", [](const StagingPool& p) { return p.stats().locked; })
      .def_property_readonly("cuda_registered",
                             [](const StagingPool& p) { return p.stats().cuda_registered; })
      .def_property_readonly("closed", &StagingPool::closed)
      .def_property_readonly("base_ptr", [](const StagingPool& p) {
        const auto s = p.stats();
        if (s.base == 0) throw py::value_error("pool is closed");
        return s.base;
      })
      .def("__repr__", [](const StagingPool& p) {
        const auto s = p.stats();
        return "<StagingPool capacity=" + std::to_string(s.capacity) + " used=" +
               std::to_string(s.used) + (p.closed() ? " closed>" : ">");
      });
}

}  // namespace rkpy
