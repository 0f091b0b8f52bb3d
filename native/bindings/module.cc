// The recoverkit._C extension module: registers every binding and translates the core's
// C++ exceptions into Python's (OSError with errno and filename, recoverkit.errors classes).

#include <pybind11/pybind11.h>

#include <cstring>
#include <exception>

#include "bindings.h"
#include "recoverkit/crc32c.h"
#include "recoverkit/cuda_driver.h"
#include "recoverkit/errors.h"

namespace rkpy {

void raise(const py::object& exc) {
  set_error(exc);
  throw py::error_already_set();
}

void set_error(const py::object& exc) {
  PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(exc.ptr())), exc.ptr());
}

py::object error_class(const char* name) {
  return py::module_::import("recoverkit.errors").attr(name);
}

std::string fs_path(const py::handle& path) {
  py::bytes b = py::module_::import("os").attr("fsencode")(path);
  std::string s(b);
  if (s.find('\0') != std::string::npos)
    throw py::value_error("path contains a NUL byte: " + py::repr(path).cast<std::string>());
  return s;
}

namespace {

// The integer value of v (operator.index), and whether it fits in a long long.
long long index_value(const py::handle& v, bool& fits) {
  auto i = py::reinterpret_steal<py::object>(PyNumber_Index(v.ptr()));
  if (!i) throw py::error_already_set();
  int overflow = 0;
  const long long x = PyLong_AsLongLongAndOverflow(i.ptr(), &overflow);
  if (x == -1 && PyErr_Occurred()) throw py::error_already_set();
  fits = overflow == 0;
  return x;
}

std::string index_repr(const py::handle& v) {
  return py::str(py::reinterpret_steal<py::object>(PyNumber_Index(v.ptr())));
}

}  // namespace

int64_t int_arg(const py::handle& v, const char* name) {
  bool fits;
  const long long x = index_value(v, fits);
  if (!fits) {
    PyErr_SetString(PyExc_OverflowError, (std::string(name) + " must fit in a signed 64-bit integer, got " +
                                          index_repr(v)).c_str());
    throw py::error_already_set();
  }
  return x;
}

int64_t size_arg(const py::handle& v, const char* name) { return non_negative(int_arg(v, name), name); }

bool crc_value(const py::handle& v, uint32_t& out) {
  bool fits;
  const long long x = index_value(v, fits);
  if (!fits || x < 0 || x > 0xFFFFFFFFll) return false;
  out = static_cast<uint32_t>(x);
  return true;
}

uint32_t crc_arg(const py::handle& v, const char* name) {
  uint32_t out = 0;
  if (!crc_value(v, out))
    throw py::value_error(std::string(name) + " must be a 32-bit CRC in [0, 2**32), got " + index_repr(v));
  return out;
}

py::object fs_decode(const std::string& path) {
  return py::reinterpret_steal<py::object>(
      PyUnicode_DecodeFSDefaultAndSize(path.data(), static_cast<Py_ssize_t>(path.size())));
}

int64_t non_negative(int64_t v, const char* name) {
  if (v < 0) throw py::value_error(std::string(name) + " must be >= 0, got " + std::to_string(v));
  return v;
}

namespace {

void translate(std::exception_ptr p) {
  try {
    if (p) std::rethrow_exception(p);
  } catch (const recoverkit::OsError& e) {
    py::object os_error = py::module_::import("builtins").attr("OSError");
    if (e.path().empty()) {
      PyErr_SetObject(os_error.ptr(), py::make_tuple(e.err(), e.what()).ptr());
    } else {  // OSError(errno, strerror, filename) picks the subclass (FileNotFoundError...)
      const std::string reason = e.reason().empty() ? std::strerror(e.err()) : e.reason();
      set_error(os_error(e.err(), reason, fs_decode(e.path())));
    }
  } catch (const recoverkit::IntegrityFailure& e) {
    py::dict kw;
    kw["path"] = fs_decode(e.path());
    set_error(error_class("IntegrityError")(e.what(), **kw));
  } catch (const recoverkit::PoolExhausted& e) {
    set_error(error_class("PoolExhaustedError")(e.what()));
  } catch (const recoverkit::CudaFailure& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
}

}  // namespace
}  // namespace rkpy

PYBIND11_MODULE(_C, m) {
  namespace py = pybind11;
  m.doc() = "recoverkit's native engine: CRC-32C, staging pool, copy engine, segment I/O.";
  py::register_exception_translator(&rkpy::translate);
  m.attr("BACKEND") = "native";
  m.def("hardware_crc32c", &recoverkit::crc32c_hardware,
        "Whether crc32c uses the CPU's CRC instruction (SSE4.2 / ARMv8 CRC).");
  m.def("cuda_available", [] { return recoverkit::CudaDriver::get() != nullptr; },
        "Whether libcuda.so.1 was loaded and cuInit succeeded.");
  rkpy::bind_crc(m);
  rkpy::bind_pool(m);
  rkpy::bind_copy(m);
  rkpy::bind_segment(m);
}
