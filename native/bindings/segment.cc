// write_segment / read_segment: many buffers to and from one file, with checksums.

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <vector>

#include "bindings.h"
#include "recoverkit/segment_io.h"

namespace rkpy {
namespace {

// An integer field (TypeError for anything that is not an int, like operator.index).
int64_t as_int(const py::handle& v) {
  auto i = py::reinterpret_steal<py::object>(PyNumber_Index(v.ptr()));
  if (!i) throw py::error_already_set();
  const long long x = PyLong_AsLongLong(i.ptr());
  if (x == -1 && PyErr_Occurred()) throw py::error_already_set();
  return x;
}

int64_t item_int(const py::handle& v, const char* name) { return non_negative(as_int(v), name); }

py::tuple item_tuple(const py::handle& item, size_t n, const char* shape) {
  py::tuple t = py::tuple(py::reinterpret_borrow<py::object>(item));
  if (t.size() != n) throw py::value_error(std::string("segment items must be ") + shape);
  return t;
}

}  // namespace

void bind_segment(py::module_& m) {
  m.def(
      "write_segment",
      [](const py::object& path, const py::iterable& items, bool direct, bool fsync,
         bool crc) -> py::object {
        std::vector<recoverkit::WriteItem> v;
        for (const auto& item : items) {
          py::tuple t = item_tuple(item, 3, "(file_offset, src_ptr, nbytes)");
          const int64_t off = item_int(t[0], "file_offset"), ptr = item_int(t[1], "src_ptr"),
                        n = item_int(t[2], "nbytes");
          if (n > 0 && ptr == 0) throw py::value_error("src_ptr is 0 (null) with nbytes > 0");
          v.push_back({static_cast<uint64_t>(off), reinterpret_cast<const void*>(ptr),
                       static_cast<uint64_t>(n)});
        }
        const std::string p = fs_path(path);
        std::vector<uint32_t> crcs;
        {
          py::gil_scoped_release release;
          crcs = recoverkit::write_segment(p, v, direct, fsync, crc);
        }
        if (!crc) return py::none();
        return py::cast(crcs);
      },
      py::arg("path"), py::arg("items"), py::kw_only(), py::arg("direct") = false,
      py::arg("fsync") = true, py::arg("crc") = false,
      "Writes (file_offset, src_ptr, nbytes) items into a new file at `path` and fsyncs it; "
      "with crc=True returns each item's CRC-32C, computed in the same pass.");
  m.def(
      "read_segment",
      [](const py::object& path, const py::iterable& items) {
        std::vector<recoverkit::ReadItem> v;
        for (const auto& item : items) {
          py::tuple t = item_tuple(item, 4, "(file_offset, dst_ptr, nbytes, expected_crc)");
          const int64_t off = item_int(t[0], "file_offset"), ptr = item_int(t[1], "dst_ptr"),
                        n = item_int(t[2], "nbytes"), expected = as_int(t[3]);
          if (n > 0 && ptr == 0) throw py::value_error("dst_ptr is 0 (null) with nbytes > 0");
          if (expected < -1 || expected > 0xFFFFFFFFll)
            throw py::value_error("expected_crc must be -1 or in [0, 2**32)");
          v.push_back({static_cast<uint64_t>(off), reinterpret_cast<void*>(ptr),
                       static_cast<uint64_t>(n), expected});
        }
        const std::string p = fs_path(path);
        std::vector<uint32_t> crcs;
        {
          py::gil_scoped_release release;
          crcs = recoverkit::read_segment(p, v);
        }
        return crcs;
      },
      py::arg("path"), py::arg("items"),
      "Reads (file_offset, dst_ptr, nbytes, expected_crc) items, verifying each checksum; "
      "returns each item's CRC-32C.");
}

}  // namespace rkpy
