// write_segment / read_segment: many buffers to and from one file, with checksums.

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <vector>

#include "bindings.h"
#include "recoverkit/segment_io.h"

namespace rkpy {
namespace {

py::tuple item_tuple(const py::handle& item, size_t n, const char* shape) {
  py::tuple t = py::tuple(py::reinterpret_borrow<py::object>(item));
  if (t.size() != n) throw py::value_error(std::string("segment items must be ") + shape);
  return t;
}

// An item's expected CRC-32C: an integer in [0, 2**32). Anything else (-1 included) would
// leave the bytes unchecked, so it is a damaged record: IntegrityError naming the file.
uint32_t expected_crc(const py::handle& v, const py::object& path, int64_t off, int64_t n) {
  uint32_t crc = 0;
  if (crc_value(v, crc)) return crc;
  py::dict kw;
  kw["path"] = path;
  raise(error_class("IntegrityError")(
      py::str("{}: expected_crc {} of the item at file offset {} ({} bytes) is not a CRC-32C "
              "(an integer in [0, 2**32)); every item is verified")
          .format(path, v, off, n),
      **kw));
}

}  // namespace

void bind_segment(py::module_& m) {
  m.def(
      "write_segment",
      [](const py::object& path, const py::iterable& items, bool direct, bool fsync,
         bool crc) -> py::object {
        const std::string p = fs_path(path);
        std::vector<recoverkit::WriteItem> v;
        for (const auto& item : items) {
          py::tuple t = item_tuple(item, 3, "(file_offset, src_ptr, nbytes)");
          const int64_t off = size_arg(t[0], "file_offset"), ptr = size_arg(t[1], "src_ptr"),
                        n = size_arg(t[2], "nbytes");
          if (n > 0 && ptr == 0) throw py::value_error("src_ptr is 0 (null) with nbytes > 0");
          v.push_back({static_cast<uint64_t>(off), reinterpret_cast<const void*>(ptr),
                       static_cast<uint64_t>(n)});
        }
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
      "with crc=True returns each item's CRC-32C, computed in the same pass. Never follows a "
      "symlink; refuses a FIFO, device or hard-linked file; unmapped sources are OSError(EFAULT).");
  m.def(
      "read_segment",
      [](const py::object& path, const py::iterable& items) {
        const std::string p = fs_path(path);
        const py::object shown = fs_decode(p);
        std::vector<recoverkit::ReadItem> v;
        for (const auto& item : items) {
          py::tuple t = item_tuple(item, 4, "(file_offset, dst_ptr, nbytes, expected_crc)");
          const int64_t off = size_arg(t[0], "file_offset"), ptr = size_arg(t[1], "dst_ptr"),
                        n = size_arg(t[2], "nbytes");
          if (n > 0 && ptr == 0) throw py::value_error("dst_ptr is 0 (null) with nbytes > 0");
          const uint32_t expected = expected_crc(t[3], shown, off, n);
          v.push_back({static_cast<uint64_t>(off), reinterpret_cast<void*>(ptr),
                       static_cast<uint64_t>(n), expected});
        }
        std::vector<uint32_t> crcs;
        {
          py::gil_scoped_release release;
          crcs = recoverkit::read_segment(p, v);
        }
        return crcs;
      },
      py::arg("path"), py::arg("items"),
      "Reads (file_offset, dst_ptr, nbytes, expected_crc) items, verifying each checksum; "
      "returns each item's CRC-32C. A symlink, a file that is not regular, a region outside "
      "the file or a mismatch is IntegrityError, raised before any byte is read except for "
      "a mismatch.");
}

}  // namespace rkpy
