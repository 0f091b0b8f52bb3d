// Shared helpers of the pybind11 bindings (the only code that sees Python).
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

namespace rkpy {

namespace py = pybind11;

void bind_crc(py::module_& m);
void bind_pool(py::module_& m);
void bind_copy(py::module_& m);
void bind_segment(py::module_& m);

// Raises the given Python exception instance (set_error only sets it, for translators).
[[noreturn]] void raise(const py::object& exc);
void set_error(const py::object& exc);

// An exception class from recoverkit.errors (imported on first use).
py::object error_class(const char* name);

// A path-like object as the file system's bytes (os.fsencode), and back for messages.
std::string fs_path(const py::handle& path);
py::object fs_decode(const std::string& path);

// A non-negative integer argument (pointer, size, offset); ValueError names it otherwise.
int64_t non_negative(int64_t v, const char* name);

}  // namespace rkpy
