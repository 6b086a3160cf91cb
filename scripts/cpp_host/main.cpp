// Example C++17 host for osx: embeds CPython and drives osx.runtime.shim through the Python C API.
//
//   osx_cpp_host BUNDLE OUT.mp4 [--prompt TEXT] [--options JSON] [--open-options JSON]
//                [--python PATH] [--cancel-after N]
//
// Opens the bundle, registers a progress callback (a C function exposed to Python as the built-in
// module `osx_host`), generates into OUT.mp4 and prints the frame count. Every shim call returns a
// status code; on any non-zero status the host prints last_error() and exits 1. Exit codes: 0 ok,
// 1 shim error (including a cancelled generation), 2 bad command line, 3 Python could not start or the
// shim could not be imported.
//
// Which Python: the interpreter is told its program name is the venv's `python` (default: the one CMake
// found, baked in at build time; override with --python or $OSX_PYTHON). CPython then reads the venv's
// pyvenv.cfg and puts that venv's site-packages, with osx installed in it, on sys.path. The venv must
// be made from the Python whose libpython the host links (same version).

#include <Python.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#ifndef OSX_DEFAULT_PYTHON
#define OSX_DEFAULT_PYTHON "python3"
#endif

namespace {

PyObject* g_shim = nullptr;  // the osx.runtime.shim module
long g_handle = 0;
long g_events = 0;
long g_cancel_after = -1;    // cancel the generation after this many progress events (demo / tests)

// --- the built-in module `osx_host`: what Python calls back into ----------------------------------

// progress(line: str) -> None. Receives one JSON line per event: {"phase", "step", "total", "elapsed", "eta"}.
PyObject* host_progress(PyObject*, PyObject* args) {
    const char* line = nullptr;
    if (!PyArg_ParseTuple(args, "s", &line)) return nullptr;
    std::fprintf(stderr, "progress %s\n", line);
    if (++g_events == g_cancel_after) {
        // cancel() only raises a flag, so it is safe to call from inside the callback (or another thread).
        PyObject* r = PyObject_CallMethod(g_shim, "cancel", "l", g_handle);
        if (r == nullptr) return nullptr;
        Py_DECREF(r);
    }
    Py_RETURN_NONE;
}

PyMethodDef host_methods[] = {
    {"progress", host_progress, METH_VARARGS, "Progress events from osx (one JSON line each)."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef host_module = {PyModuleDef_HEAD_INIT, "osx_host", "Callbacks into the C++ host.", -1, host_methods,
                           nullptr, nullptr, nullptr, nullptr};

PyObject* init_host_module() { return PyModule_Create(&host_module); }

// --- calling the shim ----------------------------------------------------------------------------------

// The shim never raises; a Python exception here means the shim itself is broken or missing.
[[noreturn]] void die_python(const char* what) {
    std::fprintf(stderr, "error: %s\n", what);
    PyErr_Print();
    std::exit(3);
}

std::string last_error() {
    PyObject* r = PyObject_CallMethod(g_shim, "last_error", nullptr);
    if (r == nullptr) die_python("shim.last_error() raised");
    const char* s = PyUnicode_AsUTF8(r);
    std::string msg = s ? s : "";
    Py_DECREF(r);
    return msg;
}

std::string status_name(long status) {
    PyObject* r = PyObject_CallMethod(g_shim, "status_name", "l", status);
    if (r == nullptr) die_python("shim.status_name() raised");
    std::string name = PyUnicode_AsUTF8(r);
    Py_DECREF(r);
    return name;
}

[[noreturn]] void die_shim(const char* call, long status) {
    std::string message = last_error();  // read it before any other shim call
    std::fprintf(stderr, "error: %s returned %s: %s\n", call, status_name(status).c_str(), message.c_str());
    std::exit(1);
}

long call_status(const char* call, PyObject* result) {
    if (result == nullptr) die_python(call);
    long status = PyLong_AsLong(result);
    Py_DECREF(result);
    if (status == -1 && PyErr_Occurred()) die_python(call);
    return status;
}

}  // namespace

int main(int argc, char** argv) {
    if (argc < 3) {
        std::fprintf(stderr, "usage: %s BUNDLE OUT.mp4 [--prompt TEXT] [--options JSON] [--open-options JSON] "
                             "[--python PATH] [--cancel-after N]\n", argv[0]);
        return 2;
    }
    const char* bundle = argv[1];
    const char* out_path = argv[2];
    std::string prompt = "a red fox running through snow";
    std::string options = "{}";       // generation options, e.g. {"seed": 1, "num_frames": 17}
    std::string open_options = "{}";  // bundle options, e.g. {"backend": "onnxruntime", "verify": false}
    std::string python = std::getenv("OSX_PYTHON") ? std::getenv("OSX_PYTHON") : OSX_DEFAULT_PYTHON;
    for (int i = 3; i < argc; i += 2) {
        if (i + 1 >= argc) { std::fprintf(stderr, "error: %s needs a value\n", argv[i]); return 2; }
        std::string flag = argv[i];
        if (flag == "--prompt") prompt = argv[i + 1];
        else if (flag == "--options") options = argv[i + 1];
        else if (flag == "--open-options") open_options = argv[i + 1];
        else if (flag == "--python") python = argv[i + 1];
        else if (flag == "--cancel-after") g_cancel_after = std::atol(argv[i + 1]);
        else { std::fprintf(stderr, "error: unknown option %s\n", argv[i]); return 2; }
    }

    // Start CPython as the venv's interpreter, with `osx_host` built in.
    if (PyImport_AppendInittab("osx_host", &init_host_module) == -1) { std::fprintf(stderr, "error: cannot add osx_host\n"); return 3; }
    PyConfig config;
    PyConfig_InitPythonConfig(&config);
    PyStatus st = PyConfig_SetBytesString(&config, &config.program_name, python.c_str());
    if (!PyStatus_Exception(st)) st = Py_InitializeFromConfig(&config);
    PyConfig_Clear(&config);
    if (PyStatus_Exception(st)) {
        std::fprintf(stderr, "error: cannot start Python as %s: %s\n", python.c_str(), st.err_msg ? st.err_msg : "?");
        return 3;
    }

    g_shim = PyImport_ImportModule("osx.runtime.shim");
    if (g_shim == nullptr) die_python("cannot import osx.runtime.shim (is osx installed in the Python given by --python?)");

    long handle = call_status("open_bundle", PyObject_CallMethod(g_shim, "open_bundle", "ss", bundle, open_options.c_str()));
    if (handle < 0) die_shim("open_bundle", handle);
    g_handle = handle;

    PyObject* host = PyImport_ImportModule("osx_host");
    if (host == nullptr) die_python("cannot import osx_host");
    PyObject* callback = PyObject_GetAttrString(host, "progress");
    if (callback == nullptr) die_python("osx_host.progress missing");
    long status = call_status("set_progress_callback", PyObject_CallMethod(g_shim, "set_progress_callback", "lO", handle, callback));
    Py_DECREF(callback);
    Py_DECREF(host);
    if (status != 0) die_shim("set_progress_callback", status);

    // generate_to_file -> (status, frames)
    PyObject* result = PyObject_CallMethod(g_shim, "generate_to_file", "lsss", handle, prompt.c_str(), out_path, options.c_str());
    if (result == nullptr) die_python("generate_to_file raised");
    long frames = 0;
    if (!PyArg_ParseTuple(result, "ll", &status, &frames)) die_python("generate_to_file returned something other than (status, frames)");
    Py_DECREF(result);
    if (status != 0) die_shim("generate_to_file", status);
    std::printf("frames: %ld\n", frames);
    std::printf("wrote: %s\n", out_path);

    status = call_status("close", PyObject_CallMethod(g_shim, "close", "l", handle));
    if (status != 0) die_shim("close", status);
    Py_DECREF(g_shim);
    return Py_FinalizeEx() < 0 ? 3 : 0;
}
