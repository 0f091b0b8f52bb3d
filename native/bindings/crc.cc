// crc32c / crc32c_ptr / crc32c_combine: CRC-32C of buffers and raw memory.

#include <pybind11/pybind11.h>

#include "bindings.h"
#include "recoverkit/crc32c.h"

namespace rkpy {
namespace {

constexpr size_t kReleaseGilBytes = 64 << 10;

uint32_t check_value(int64_t value) {
  if (value < 0 || value > 0xFFFFFFFFll)
    throw py::value_error("value must be a 32-bit CRC in [0, 2**32), got " + std::to_string(value));
  return static_cast<uint32_t>(value);
}

// Holds a C-contiguous buffer export for the duration of a call.
class Buffer {
 public:
  explicit Buffer(const py::handle& obj) {
    if (PyObject_GetBuffer(obj.ptr(), &view_, PyBUF_FULL_RO) != 0) throw py::error_already_set();
    if (!PyBuffer_IsContiguous(&view_, 'C')) {
      PyBuffer_Release(&view_);
      PyErr_SetString(PyExc_BufferError, "crc32c needs a C-contiguous buffer");
      throw py::error_already_set();
    }
  }
  ~Buffer() { PyBuffer_Release(&view_); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  const void* data() const { return view_.buf; }
  size_t size() const { return static_cast<size_t>(view_.len); }

 private:
  Py_buffer view_{};
};

template <uint32_t (*Fn)(uint32_t, const void*, size_t) noexcept>
uint32_t crc_of(const void* data, size_t n, uint32_t value) {
  if (n < kReleaseGilBytes) return Fn(value, data, n);
  py::gil_scoped_release release;
  return Fn(value, data, n);
}

}  // namespace

void bind_crc(py::module_& m) {
  m.def(
      "crc32c",
      [](const py::object& data, int64_t value) {
        Buffer buf(data);  // the export pins the bytes while the GIL is released
        return crc_of<recoverkit::crc32c_extend>(buf.data(), buf.size(), check_value(value));
      },
      py::arg("data"), py::arg("value") = 0,
      "CRC-32C of a C-contiguous buffer, extending the running CRC `value`.");
  m.def(
      "crc32c_ptr",
      [](int64_t ptr, int64_t nbytes, int64_t value) {
        non_negative(ptr, "ptr");
        non_negative(nbytes, "nbytes");
        if (nbytes > 0 && ptr == 0) throw py::value_error("ptr is 0 (null) with nbytes > 0");
        return crc_of<recoverkit::crc32c_extend>(reinterpret_cast<const void*>(ptr),
                                                 static_cast<size_t>(nbytes), check_value(value));
      },
      py::arg("ptr"), py::arg("nbytes"), py::arg("value") = 0,
      "CRC-32C of `nbytes` bytes at address `ptr`, extending `value`.");
  m.def(
      "crc32c_combine",
      [](int64_t crc_a, int64_t crc_b, int64_t len_b) {
        return recoverkit::crc32c_combine(check_value(crc_a), check_value(crc_b),
                                          static_cast<uint64_t>(non_negative(len_b, "len_b")));
      },
      py::arg("crc_a"), py::arg("crc_b"), py::arg("len_b"),
      "CRC-32C of A followed by B from crc32c(A), crc32c(B) and len(B).");
  m.def(
      "_crc32c_software",
      [](const py::object& data, int64_t value) {
        Buffer buf(data);
        return crc_of<recoverkit::crc32c_extend_sw>(buf.data(), buf.size(), check_value(value));
      },
      py::arg("data"), py::arg("value") = 0,
      "The portable table-driven CRC-32C (for tests of the hardware path).");
}

}  // namespace rkpy
