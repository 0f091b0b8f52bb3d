// CopyEngine and CopyHandle: asynchronous host/device -> host copies with CRC-32C.

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <chrono>
#include <memory>
#include <optional>

#include "bindings.h"
#include "recoverkit/copy_engine.h"

namespace rkpy {
namespace {

using recoverkit::CopyEngine;
using recoverkit::CopyJob;

struct Handle {
  std::shared_ptr<CopyJob> job;

  // Waits with the GIL released, in slices so that Ctrl-C still interrupts a long wait.
  bool wait(std::optional<double> timeout_s) const {
    using Clock = std::chrono::steady_clock;
    const auto start = Clock::now();
    for (;;) {
      double slice = 0.2;
      if (timeout_s) {
        const double left = *timeout_s - std::chrono::duration<double>(Clock::now() - start).count();
        slice = std::max(0.0, std::min(slice, left));
      }
      bool finished;
      {
        py::gil_scoped_release release;
        finished = job->wait(slice);
      }
      if (finished) return true;
      if (PyErr_CheckSignals() != 0) throw py::error_already_set();
      if (timeout_s && std::chrono::duration<double>(Clock::now() - start).count() >= *timeout_s)
        return false;
    }
  }

  uint32_t result(std::optional<double> timeout_s) const {
    if (!wait(timeout_s)) {
      PyErr_Format(PyExc_TimeoutError, "copy of %llu bytes not finished after %g s",
                   static_cast<unsigned long long>(job->nbytes()), *timeout_s);
      throw py::error_already_set();
    }
    if (job->failed()) raise(error_class("CopyError")("copy failed: " + job->error()));
    return job->crc();
  }

  uint32_t crc32c() const {
    if (!job->done()) throw py::value_error("copy not finished; wait() first");
    if (job->failed()) throw py::value_error("copy failed: " + job->error());
    return job->crc();
  }
};

}  // namespace

void bind_copy(py::module_& m) {
  py::class_<Handle>(m, "CopyHandle", "One submitted copy: wait for it, then read its CRC-32C.")
      .def("wait", &Handle::wait, py::arg("timeout_s") = py::none(),
           "Blocks until finished (success or failure) or timeout_s; returns whether finished.")
      .def("done", [](const Handle& h) { return h.job->done(); })
      .def("result", &Handle::result, py::arg("timeout_s") = py::none(),
           "Waits and returns the CRC-32C; CopyError on failure, TimeoutError on timeout.")
      .def_property_readonly("error",
                             [](const Handle& h) -> std::optional<std::string> {
                               if (!h.job->failed()) return std::nullopt;
                               return h.job->error();
                             })
      .def_property_readonly("crc32c", &Handle::crc32c)
      .def_property_readonly("nbytes", [](const Handle& h) { return h.job->nbytes(); })
      .def_property_readonly("elapsed_s", [](const Handle& h) { return h.job->elapsed_s(); })
      .def("__repr__", [](const Handle& h) {
        const char* state = !h.job->done() ? "pending" : h.job->failed() ? "failed" : "done";
        return "<CopyHandle nbytes=" + std::to_string(h.job->nbytes()) + " " + state + ">";
      });

  py::class_<CopyEngine>(m, "CopyEngine", R"doc(
Worker threads that copy (src_ptr, dst_ptr, nbytes) into host memory with CRC-32C.

Example:
    >>> with CopyEngine(num_threads=2) as eng:
    ...     h = eng.submit(src_ptr, dst_ptr, nbytes)
    ...     crc = h.result()
)doc")
      .def(py::init([](const py::object& num_threads_arg, const py::object& chunk_arg) {
             const int64_t num_threads = int_arg(num_threads_arg, "num_threads");
             const int64_t chunk_bytes = int_arg(chunk_arg, "chunk_bytes");
             if (num_threads < 1 || num_threads > 1024)
               throw py::value_error("num_threads must be in [1, 1024], got " + std::to_string(num_threads));
             if (chunk_bytes <= 0) throw py::value_error("chunk_bytes must be positive");
             return std::make_unique<CopyEngine>(static_cast<int>(num_threads),
                                                 static_cast<size_t>(chunk_bytes));
           }),
           py::arg("num_threads") = 2, py::arg("chunk_bytes") = 8 << 20)
      .def(
          "submit",
          [](CopyEngine& e, const py::object& src_arg, const py::object& dst_arg,
             const py::object& nbytes_arg, bool crc, const py::object& device_arg,
             const py::object& stream_arg) {
            const int64_t src_ptr = size_arg(src_arg, "src_ptr"), dst_ptr = size_arg(dst_arg, "dst_ptr");
            const int64_t nbytes = size_arg(nbytes_arg, "nbytes");
            const int64_t device = int_arg(device_arg, "device");
            const int64_t stream = size_arg(stream_arg, "stream");
            if (device > INT32_MAX || device < INT32_MIN) {
              PyErr_SetString(PyExc_OverflowError,
                              ("device must fit in a C int, got " + std::to_string(device)).c_str());
              throw py::error_already_set();
            }
            return Handle{e.submit(static_cast<uintptr_t>(src_ptr), static_cast<uintptr_t>(dst_ptr),
                                   nbytes, crc, static_cast<int>(device), static_cast<uintptr_t>(stream))};
          },
          py::arg("src_ptr"), py::arg("dst_ptr"), py::arg("nbytes"), py::kw_only(),
          py::arg("crc") = true, py::arg("device") = -1, py::arg("stream") = 0,
          "Queues a copy of nbytes from src_ptr (a device pointer when device >= 0) to dst_ptr; "
          "OSError(EFAULT) at once when a page of a host range is not mapped.")
      .def("close", &CopyEngine::close, py::call_guard<py::gil_scoped_release>(),
           "Fails pending copies with 'engine closed' and joins the workers (idempotent).")
      .def("__enter__", [](py::object self) { return self; })
      .def("__exit__",
           [](CopyEngine& e, const py::args&) {
             py::gil_scoped_release release;
             e.close();
           })
      .def_property_readonly("num_threads", &CopyEngine::num_threads)
      .def_property_readonly("chunk_bytes", &CopyEngine::chunk_bytes)
      .def("stats", [](const CopyEngine& e) {
        const auto s = e.stats();
        py::dict d;
        d["bytes_copied"] = s.bytes_copied;
        d["copies_done"] = s.copies_done;
        d["copies_failed"] = s.copies_failed;
        d["copies_pending"] = s.copies_pending;
        return d;
      });
}

}  // namespace rkpy
