// The steering hook's transport as one CPU pass (see actsteer/kernels.py):
// out = fma(a, scale, shift) where lo <= a <= hi, a elsewhere; with `second_half_only`, the
// first half of the rows is left unchanged (the unconditional half of a classifier-free-guidance
// batch). `out` is a new tensor, or `a` itself when the caller owns it (`in_place`: a norm's
// fresh output that no other hook has seen).
//
// `lo` and `hi` hold one value per unit; `scale` and `shift` the same units once (shared,
// rows = 0) or once per steered batch row (per-row strength, rows = the steered rows). The
// affine part rounds once (fma in the dtype's math type), as torch.addcmul does on CPU. An
// unbounded support passes ±inf bounds.
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/extension.h>

#include <ATen/EmptyTensor.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <cmath>
#include <optional>

namespace {

// The two loops below are kept out of line: inlined into the parallel lambda, GCC 12 stops
// vectorizing them (checked with -fopt-info-vec; 4.6x slower on an (8, 16, 576) float32 input).
// `a` and `out` may be the same memory (in place): each element is read before it is written.

// Units along the last axis: every run of n elements has its own scale, shift and bounds.
template <typename T>
__attribute__((noinline)) void transport_units(const T* a,
                                               const T* __restrict__ scale,
                                               const T* __restrict__ shift,
                                               const T* __restrict__ lo, const T* __restrict__ hi,
                                               T* out, int64_t n) {
  using Math = at::opmath_type<T>;
  for (int64_t k = 0; k < n; ++k) {
    const Math v = static_cast<Math>(a[k]);
    const Math moved = std::fma(v, static_cast<Math>(scale[k]), static_cast<Math>(shift[k]));
    const bool inside = (v >= static_cast<Math>(lo[k])) & (v <= static_cast<Math>(hi[k]));
    out[k] = inside ? static_cast<T>(moved) : a[k];
  }
}

// One unit over n elements (a channel over its H×W pixels): scalar scale, shift and bounds.
template <typename T>
__attribute__((noinline)) void transport_channel(const T* a, T scale, T shift, T lo, T hi,
                                                 T* out, int64_t n) {
  using Math = at::opmath_type<T>;
  const Math s = scale, b = shift, l = lo, h = hi;
  for (int64_t k = 0; k < n; ++k) {
    const Math v = static_cast<Math>(a[k]);
    const Math moved = std::fma(v, s, b);
    out[k] = (v >= l) & (v <= h) ? static_cast<T>(moved) : a[k];
  }
}

}  // namespace

// The transport of `a`, or None where this kernel does not apply and the caller uses torch ops
// (also to raise its errors): a not a 2-, 3- or 4-D contiguous CPU tensor of the parameters'
// floating dtype, a gradient to carry, a unit count other than the map's, or per-row
// parameters for another number of rows. Units lie on axis 1 of a 4-D a (a per-channel map
// over H×W), on the last axis otherwise. With second_half_only (an even batch), the first half
// of the rows is left unchanged. With in_place, `a` is overwritten and returned (except an
// inference tensor outside inference mode, which gets a new tensor). `second_half_only` and `a`
// come last: a bound hook (below) holds the rest and passes only those two per call.
std::optional<torch::Tensor> transport(const torch::Tensor& scale, const torch::Tensor& shift,
                                       const torch::Tensor& lo, const torch::Tensor& hi,
                                       int64_t rows, bool in_place, bool second_half_only,
                                       const torch::Tensor& a) {
  const auto dtype = a.scalar_type();
  if (a.dim() < 2 || a.dim() > 4 || !a.device().is_cpu() || !a.is_contiguous() ||
      (a.requires_grad() && at::GradMode::is_enabled()) ||
      !(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
        dtype == at::kBFloat16)) {
    return std::nullopt;
  }
  for (const auto* t : {&scale, &shift, &lo, &hi}) {
    if (t->scalar_type() != dtype || !t->device().is_cpu() || !t->is_contiguous()) {
      return std::nullopt;
    }
  }
  const bool channels = a.dim() == 4;
  const int64_t units = lo.numel();
  const int64_t batch = a.size(0);
  if (units == 0 || hi.numel() != units || a.size(channels ? 1 : a.dim() - 1) != units ||
      batch == 0 || (second_half_only && batch % 2 != 0)) {
    return std::nullopt;
  }
  const int64_t first_row = second_half_only ? batch / 2 : 0;
  const bool per_row = rows > 0;
  if ((per_row && batch - first_row != rows) || scale.numel() != (per_row ? rows : 1) * units ||
      shift.numel() != scale.numel()) {
    return std::nullopt;
  }
  const int64_t inner = channels ? a.size(2) * a.size(3) : 1;
  const int64_t run = channels ? inner : units;  // elements sharing one parameter layout
  const int64_t runs = inner == 0 ? 0 : a.numel() / run;
  const int64_t runs_per_row = runs / batch;
  const int64_t first = first_row * runs_per_row;

  const bool overwrite = in_place && (!a.is_inference() || c10::InferenceMode::is_enabled());
  const torch::Tensor out =
      overwrite ? a : torch::Tensor(at::detail::empty_cpu(a.sizes(), dtype));
  if (overwrite) {
    a.unsafeGetTensorImpl()->bump_version();
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "actsteer_transport", [&] {
    const scalar_t* a_ = a.const_data_ptr<scalar_t>();
    const scalar_t* scale_ = scale.const_data_ptr<scalar_t>();
    const scalar_t* shift_ = shift.const_data_ptr<scalar_t>();
    const scalar_t* lo_ = lo.const_data_ptr<scalar_t>();
    const scalar_t* hi_ = hi.const_data_ptr<scalar_t>();
    scalar_t* out_ = out.mutable_data_ptr<scalar_t>();
    if (!overwrite) {
      std::copy(a_, a_ + first * run, out_);
    }
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, run));
    at::parallel_for(first, runs, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t row = per_row ? ((r - first) / runs_per_row) * units : 0;
        if (!channels) {
          transport_units<scalar_t>(a_ + r * run, scale_ + row, shift_ + row, lo_, hi_,
                                    out_ + r * run, run);
        } else {
          const int64_t u = r % units;
          transport_channel<scalar_t>(a_ + r * run, scale_[row + u], shift_[row + u], lo_[u],
                                      hi_[u], out_ + r * run, run);
        }
      }
    });
  });
  return out;
}

// The Python entry points, in CPython's fast calling convention (METH_FASTCALL): called once per
// hooked module per forward pass, where pybind11's generic dispatch cost several microseconds
// (cold caches inside a model). A tensor subclass, which may override torch functions, is left
// to the caller's torch ops, so that they honour it.
namespace {

bool plain_tensors(PyObject* const* args, std::initializer_list<int> indices) {
  for (const int i : indices) {
    if (!THPVariable_CheckExact(args[i])) {
      return false;
    }
  }
  return true;
}

// The shared head of both entry points: 8 arguments, `rows` (an int) at 4 and `in_place` (a
// truth value) at 5. False with a Python error set when they are not.
bool read_rows_in_place(const char* name, PyObject* const* args, Py_ssize_t nargs,
                        int64_t& rows, bool& in_place) {
  if (nargs != 8) {
    PyErr_Format(PyExc_TypeError, "%s() takes 8 arguments (%zd given)", name, nargs);
    return false;
  }
  rows = PyLong_AsLongLong(args[4]);
  const int flag = PyObject_IsTrue(args[5]);
  in_place = flag == 1;
  return !(rows == -1 && PyErr_Occurred()) && flag >= 0;
}

// transport(scale, shift, lo, hi, rows, in_place, second_half_only, a), as above.
PyObject* transport_fastcall(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  int64_t rows = 0;
  bool in_place = false;
  if (!read_rows_in_place("transport", args, nargs, rows, in_place)) {
    return nullptr;
  }
  if (!plain_tensors(args, {0, 1, 2, 3, 7})) {
    Py_RETURN_NONE;
  }
  const int second_half_only = PyObject_IsTrue(args[6]);
  if (second_half_only < 0) {
    return nullptr;
  }
  const auto out = transport(THPVariable_Unpack(args[0]), THPVariable_Unpack(args[1]),
                             THPVariable_Unpack(args[2]), THPVariable_Unpack(args[3]), rows,
                             in_place, second_half_only, THPVariable_Unpack(args[7]));
  if (!out) {
    Py_RETURN_NONE;
  }
  return THPVariable_Wrap(*out);
  END_HANDLE_TH_ERRORS
}

// A forward hook with its parameters bound (see hook() below).
struct BoundHook {
  torch::Tensor scale, shift, lo, hi;
  int64_t rows;
  bool in_place;
  PyObject* halves;    // an object whose `split` says "second half only", or None
  PyObject* fallback;  // the Python hook, for every output the kernel does not take
};

constexpr const char* kBoundHook = "actsteer.BoundHook";

void free_bound_hook(PyObject* capsule) {
  auto* bound = static_cast<BoundHook*>(PyCapsule_GetPointer(capsule, kBoundHook));
  Py_XDECREF(bound->halves);
  Py_XDECREF(bound->fallback);
  delete bound;
}

// hook(module, args, output), as PyTorch calls a forward hook.
PyObject* bound_hook_call(PyObject* capsule, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  const auto* bound = static_cast<BoundHook*>(PyCapsule_GetPointer(capsule, kBoundHook));
  if (nargs == 3 && THPVariable_CheckExact(args[2])) {
    int second_half_only = 0;
    if (bound->halves != Py_None) {
      static PyObject* const split_name = PyUnicode_InternFromString("split");
      PyObject* split = PyObject_GetAttr(bound->halves, split_name);
      second_half_only = split ? PyObject_IsTrue(split) : -1;
      Py_XDECREF(split);
      if (second_half_only < 0) {
        return nullptr;
      }
    }
    const auto out = transport(bound->scale, bound->shift, bound->lo, bound->hi, bound->rows,
                               bound->in_place, second_half_only, THPVariable_Unpack(args[2]));
    if (out) {
      return THPVariable_Wrap(*out);
    }
  }
  return PyObject_Vectorcall(bound->fallback, args, nargs, nullptr);
  END_HANDLE_TH_ERRORS
}

PyMethodDef bound_hook_def = {
    "steering_hook", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(bound_hook_call)),
    METH_FASTCALL, "A steering forward hook: hook(module, args, output)"};

// hook(scale, shift, lo, hi, rows, in_place, halves, fallback): a forward hook that transports
// a plain tensor output in this kernel, with no Python frame on the way, and hands any other
// output (or one the kernel declines) to fallback(module, args, output).
PyObject* hook_fastcall(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  int64_t rows = 0;
  bool in_place = false;
  if (!read_rows_in_place("hook", args, nargs, rows, in_place)) {
    return nullptr;
  }
  if (!plain_tensors(args, {0, 1, 2, 3}) || !PyCallable_Check(args[7])) {
    PyErr_SetString(PyExc_TypeError,
                    "hook() takes plain tensors for scale, shift, lo and hi, and a callable "
                    "fallback last");
    return nullptr;
  }
  auto* bound = new BoundHook{THPVariable_Unpack(args[0]), THPVariable_Unpack(args[1]),
                              THPVariable_Unpack(args[2]), THPVariable_Unpack(args[3]),
                              rows, in_place, args[6], args[7]};
  Py_INCREF(bound->halves);
  Py_INCREF(bound->fallback);
  PyObject* capsule = PyCapsule_New(bound, kBoundHook, free_bound_hook);
  if (capsule == nullptr) {
    Py_DECREF(bound->halves);
    Py_DECREF(bound->fallback);
    delete bound;
    return nullptr;
  }
  PyObject* hook = PyCFunction_New(&bound_hook_def, capsule);
  Py_DECREF(capsule);
  return hook;
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"transport", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(transport_fastcall)),
     METH_FASTCALL,
     "transport(scale, shift, lo, hi, rows, in_place, second_half_only, a): affine map inside "
     "per-unit bounds, identity outside, optionally on the second half of the rows only, "
     "optionally in place; None where the kernel does not apply"},
    {"hook", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(hook_fastcall)),
     METH_FASTCALL,
     "hook(scale, shift, lo, hi, rows, in_place, halves, fallback): a forward hook running "
     "transport() on tensor outputs (second half only where halves.split), fallback(module, "
     "args, output) for the rest"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  if (PyModule_AddFunctions(m.ptr(), methods) < 0) {
    throw pybind11::error_already_set();
  }
}
