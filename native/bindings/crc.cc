// crc32c / crc32c_ptr / crc32c_combine: CRC-32C of buffers and raw memory.

#include <pybind11/pybind11.h>

#include "bindings.h"
#include "recoverkit/crc32c.h"
#include "recoverkit/mem_check.h"

namespace rkpy {
namespace {

constexpr size_t kReleaseGilBytes = 64 << 10;

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
      [](const py::object& data, const py::object& value) {
        const uint32_t start = crc_arg(value, "value");
        Buffer buf(data);  // the export pins the bytes while the GIL is released
        return crc_of<recoverkit::crc32c_extend>(buf.data(), buf.size(), start);
      },
      py::arg("data"), py::arg("value") = 0,
      "CRC-32C of a C-contiguous buffer, extending the running CRC `value`.");
  m.def(
      "crc32c_ptr",
      [](const py::object& ptr_arg, const py::object& nbytes_arg, const py::object& value) {
        const int64_t ptr = size_arg(ptr_arg, "ptr"), nbytes = size_arg(nbytes_arg, "nbytes");
        const uint32_t start = crc_arg(value, "value");
        if (nbytes > 0 && ptr == 0) throw py::value_error("ptr is 0 (null) with nbytes > 0");
        recoverkit::check_mapped(static_cast<uintptr_t>(ptr), static_cast<uint64_t>(nbytes), "crc32c_ptr: ptr");
        return crc_of<recoverkit::crc32c_extend>(reinterpret_cast<const void*>(ptr),
                                                 static_cast<size_t>(nbytes), start);
      },
      py::arg("ptr"), py::arg("nbytes"), py::arg("value") = 0,
      "CRC-32C of `nbytes` bytes at address `ptr`, extending `value`; OSError(EFAULT) when a "
      "page of the range is not mapped (mapped but unreadable pages stay the caller's contract).");
  m.def(
      "crc32c_combine",
      [](const py::object& crc_a, const py::object& crc_b, const py::object& len_b) {
        return recoverkit::crc32c_combine(crc_arg(crc_a, "crc_a"), crc_arg(crc_b, "crc_b"),
                                          static_cast<uint64_t>(size_arg(len_b, "len_b")));
      },
      py::arg("crc_a"), py::arg("crc_b"), py::arg("len_b"),
      "CRC-32C of A followed by B from crc32c(A), crc32c(B) and len(B).");
  m.def(
      "_crc32c_software",
      [](const py::object& data, const py::object& value) {
        const uint32_t start = crc_arg(value, "value");
        Buffer buf(data);
        return crc_of<recoverkit::crc32c_extend_sw>(buf.data(), buf.size(), start);
      },
      py::arg("data"), py::arg("value") = 0,
      "The portable table-driven CRC-32C (for tests of the hardware path).");
}

}  // namespace rkpy
