// The transport of actsteer.transport as one CPU pass (built by actsteer/kernels/__init__.py):
// out = fma(a, scale, shift) where lo < a < hi (the support is open, as in the reference
// implementation), a elsewhere. `out` is a new tensor, or `a` itself when the caller owns it
// (`in_place`: a norm's fresh output that no other hook has seen).
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
#include <vector>

namespace {

// The two loops below are kept out of line: inlined into the lambda over runs, GCC 12 stops
// vectorizing them (checked with -fopt-info-vec; 4.6x slower on an (8, 16, 576) float32 input).
// `a` and `out` may be the same memory (in place): each element is read before it is written.

// For each of a row's units, how many of its interior knots (levels 1 … K − 2 of the
// level-major x) lie at or below its value: the segment it falls in, the end segments taking
// everything past the outer knots.
template <typename T>
__attribute__((noinline)) void count_at_or_above(const T* __restrict__ row,
                                                 const float* __restrict__ x,
                                                 int32_t* __restrict__ segment, int64_t units,
                                                 int64_t knots) {
  std::fill(segment, segment + units, 0);
  for (int64_t level = 1; level < knots - 1; ++level) {
    const float* knot = x + level * units;
    for (int64_t u = 0; u < units; ++u) {
      segment[u] += static_cast<float>(row[u]) >= knot[u];
    }
  }
}

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
    const bool inside = (v > static_cast<Math>(lo[k])) & (v < static_cast<Math>(hi[k]));
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
    out[k] = (v > l) & (v < h) ? static_cast<T>(moved) : a[k];
  }
}

// One row with its own λ: ω̃ = 1 + λ(ω − 1) and λβ computed in float32 and rounded to the
// dtype, as AffineMap.at and `.to(dtype)` do in torch (two roundings, no fma: -ffp-contract=off),
// then the same fma and bounds as transport_units.
template <typename T>
__attribute__((noinline)) void transport_row(const T* a, float lam,
                                             const float* __restrict__ omega_minus_one,
                                             const float* __restrict__ beta,
                                             const T* __restrict__ lo, const T* __restrict__ hi,
                                             T* out, int64_t n) {
  using Math = at::opmath_type<T>;
  for (int64_t k = 0; k < n; ++k) {
    const float scaled = lam * omega_minus_one[k];
    const Math scale = static_cast<Math>(static_cast<T>(scaled + 1.0f));
    const Math shift = static_cast<Math>(static_cast<T>(lam * beta[k]));
    const Math v = static_cast<Math>(a[k]);
    const Math moved = std::fma(v, scale, shift);
    const bool inside = (v > static_cast<Math>(lo[k])) & (v < static_cast<Math>(hi[k]));
    out[k] = inside ? static_cast<T>(moved) : a[k];
  }
}

// One map as the loops read it: its parameters checked once (when a hook is bound) rather
// than on every call. `rows` is 0 for parameters shared by all rows, else the number of
// steered rows, each with its own scale and shift.
struct Map {
  at::ScalarType dtype;
  int64_t units;
  int64_t rows;
  const void* scale;
  const void* shift;
  const void* lo;
  const void* hi;
};

// The map of these tensors, or nothing when the kernel cannot read them: not all CPU,
// contiguous and of one floating dtype, or sizes that do not agree.
std::optional<Map> read_map(const at::Tensor& scale, const at::Tensor& shift,
                            const at::Tensor& lo, const at::Tensor& hi, int64_t rows) {
  const auto dtype = lo.scalar_type();
  if (!(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
        dtype == at::kBFloat16)) {
    return std::nullopt;
  }
  for (const auto* t : {&scale, &shift, &lo, &hi}) {
    if (t->scalar_type() != dtype || !t->device().is_cpu() || !t->is_contiguous()) {
      return std::nullopt;
    }
  }
  const int64_t units = lo.numel();
  if (units == 0 || hi.numel() != units || rows < 0 ||
      scale.numel() != (rows > 0 ? rows : 1) * units || shift.numel() != scale.numel()) {
    return std::nullopt;
  }
  return Map{dtype,
             units,
             rows,
             scale.const_data_ptr(),
             shift.const_data_ptr(),
             lo.const_data_ptr(),
             hi.const_data_ptr()};
}

// Whether the kernel takes `a`: a 2-, 3- or 4-D contiguous CPU tensor of the map's dtype with
// no gradient to carry, the map's units on axis 1 (4-D: a per-channel map over H×W) or last,
// and one parameter set per row if per-row.
bool fits(const Map& map, const at::Tensor& a) {
  const int64_t dims = a.dim();
  if (dims < 2 || dims > 4 || a.scalar_type() != map.dtype || !a.device().is_cpu() ||
      !a.is_contiguous() || (a.requires_grad() && at::GradMode::is_enabled())) {
    return false;
  }
  const int64_t batch = a.size(0);
  return a.size(dims == 4 ? 1 : dims - 1) == map.units && batch > 0 &&
         (map.rows == 0 || batch == map.rows);
}

// The transport of `a` written to `out` (a's own memory, or a new buffer of a's size).
void transport_into(const Map& map, const at::Tensor& a, void* out) {
  const bool channels = a.dim() == 4;
  const int64_t batch = a.size(0);
  const int64_t run = channels ? a.size(2) * a.size(3) : map.units;  // one parameter layout
  const int64_t runs_per_row = run == 0 ? 0 : a.numel() / batch / run;
  if (runs_per_row == 0) {
    return;  // no elements
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, map.dtype, "actsteer_transport", [&] {
    const auto* a_ = static_cast<const scalar_t*>(a.const_data_ptr());
    auto* out_ = static_cast<scalar_t*>(out);
    const auto* scale = static_cast<const scalar_t*>(map.scale);
    const auto* shift = static_cast<const scalar_t*>(map.shift);
    const auto* lo = static_cast<const scalar_t*>(map.lo);
    const auto* hi = static_cast<const scalar_t*>(map.hi);
    // runs [begin, end), a row at a time: no division per run
    const auto steer_runs = [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end;) {
        const int64_t row = r / runs_per_row;
        const int64_t row_end = std::min(end, (row + 1) * runs_per_row);
        const int64_t params = map.rows > 0 ? row * map.units : 0;
        for (; r < row_end; ++r) {
          if (channels) {
            const int64_t u = r - row * runs_per_row;  // runs_per_row == units
            transport_channel<scalar_t>(a_ + r * run, scale[params + u], shift[params + u],
                                        lo[u], hi[u], out_ + r * run, run);
          } else {
            transport_units<scalar_t>(a_ + r * run, scale + params, shift + params, lo, hi,
                                      out_ + r * run, run);
          }
        }
      }
    };
    const int64_t end = batch * runs_per_row;
    const int64_t grain = std::max<int64_t>(1, 32768 / run);
    if (end <= grain) {
      steer_runs(0, end);  // small: skip the thread pool's bookkeeping
    } else {
      at::parallel_for(0, end, grain, steer_runs);
    }
  });
}

}  // namespace

// The Python entry points, in CPython's fast calling convention (METH_FASTCALL): called once per
// hooked module per forward pass, where pybind11's generic dispatch cost several microseconds
// (cold caches inside a model). A tensor subclass, which may override torch functions, is left
// to the caller's torch ops, so that they honour it. No tensor handle is copied per call: each
// would take the interpreter's lock to update the Python object it belongs to.
namespace {

bool plain_tensors(PyObject* const* args, std::initializer_list<int> indices) {
  for (const int i : indices) {
    if (!THPVariable_CheckExact(args[i])) {
      return false;
    }
  }
  return true;
}

// The shared head of both entry points: 7 arguments, `rows` (an int) at 4 and `in_place` (a
// truth value) at 5. False with a Python error set when they are not.
bool read_rows_in_place(const char* name, PyObject* const* args, Py_ssize_t nargs,
                        int64_t& rows, bool& in_place) {
  if (nargs != 7) {
    PyErr_Format(PyExc_TypeError, "%s() takes 7 arguments (%zd given)", name, nargs);
    return false;
  }
  rows = PyLong_AsLongLong(args[4]);
  const int flag = PyObject_IsTrue(args[5]);
  in_place = flag == 1;
  return !(rows == -1 && PyErr_Occurred()) && flag >= 0;
}

std::optional<Map> map_of(PyObject* const* args, int64_t rows) {
  return read_map(THPVariable_Unpack(args[0]), THPVariable_Unpack(args[1]),
                  THPVariable_Unpack(args[2]), THPVariable_Unpack(args[3]), rows);
}

// The transport of the tensor `a_obj` (which fits the map) as a new reference: `a_obj` itself,
// overwritten, where in_place allows (not an inference tensor outside inference mode).
PyObject* transported(const Map& map, PyObject* a_obj, bool in_place) {
  const at::Tensor& a = THPVariable_Unpack(a_obj);
  if (in_place && (!a.is_inference() || c10::InferenceMode::is_enabled())) {
    transport_into(map, a, a.mutable_data_ptr());
    a.unsafeGetTensorImpl()->bump_version();
    Py_INCREF(a_obj);
    return a_obj;
  }
  at::Tensor out = at::detail::empty_cpu(a.sizes(), map.dtype);
  transport_into(map, a, out.mutable_data_ptr());
  return THPVariable_Wrap(std::move(out));
}

// transport(scale, shift, lo, hi, rows, in_place, a): the transport of `a`,
// or None where this kernel does not apply (see read_map and fits) and the caller uses torch
// ops, also to raise their errors. With in_place, `a` is overwritten and returned.
PyObject* transport_fastcall(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  int64_t rows = 0;
  bool in_place = false;
  if (!read_rows_in_place("transport", args, nargs, rows, in_place)) {
    return nullptr;
  }
  if (!plain_tensors(args, {0, 1, 2, 3, 6})) {
    Py_RETURN_NONE;
  }
  const auto map = map_of(args, rows);
  if (!map || !fits(*map, THPVariable_Unpack(args[6]))) {
    Py_RETURN_NONE;
  }
  return transported(*map, args[6], in_place);
  END_HANDLE_TH_ERRORS
}

// transport_tokens(omega_minus_one, beta, lo, hi, lam, a): a (tokens, units) tensor with one λ
// per token (a flattened batch of requests, as vLLM runs it), ω − 1 and β in float32, the
// bounds in a's dtype; a new tensor, or None where the kernel does not apply (an empty one
// included: the caller's torch ops handle it).
PyObject* transport_tokens_fastcall(PyObject* /*module*/, PyObject* const* args,
                                    Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 6) {
    PyErr_Format(PyExc_TypeError, "transport_tokens() takes 6 arguments (%zd given)", nargs);
    return nullptr;
  }
  if (!plain_tensors(args, {0, 1, 2, 3, 4, 5})) {
    Py_RETURN_NONE;
  }
  const at::Tensor& omega_minus_one = THPVariable_Unpack(args[0]);
  const at::Tensor& beta = THPVariable_Unpack(args[1]);
  const at::Tensor& lam = THPVariable_Unpack(args[4]);
  const at::Tensor& a = THPVariable_Unpack(args[5]);
  // lo and hi stand in for scale and shift in read_map's checks: a's dtype, CPU, contiguous
  const auto bounds = read_map(THPVariable_Unpack(args[2]), THPVariable_Unpack(args[3]),
                               THPVariable_Unpack(args[2]), THPVariable_Unpack(args[3]), 0);
  // fits: a 2-D output of the bounds' dtype and units, with at least one token
  if (!bounds || a.dim() != 2 || !fits(*bounds, a)) {
    Py_RETURN_NONE;
  }
  const int64_t tokens = a.size(0), units = bounds->units;
  for (const auto* t : {&omega_minus_one, &beta, &lam}) {
    if (t->scalar_type() != at::kFloat || !t->device().is_cpu() || !t->is_contiguous()) {
      Py_RETURN_NONE;
    }
  }
  if (omega_minus_one.numel() != units || beta.numel() != units || lam.numel() != tokens) {
    Py_RETURN_NONE;
  }
  at::Tensor out = at::detail::empty_cpu(a.sizes(), bounds->dtype);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, bounds->dtype, "actsteer_tokens", [&] {
    const auto* a_ = a.const_data_ptr<scalar_t>();
    auto* out_ = out.mutable_data_ptr<scalar_t>();
    const auto* lam_ = lam.const_data_ptr<float>();
    const auto* om1 = omega_minus_one.const_data_ptr<float>();
    const auto* beta_ = beta.const_data_ptr<float>();
    const auto* lo = static_cast<const scalar_t*>(bounds->lo);
    const auto* hi = static_cast<const scalar_t*>(bounds->hi);
    const auto rows = [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        transport_row<scalar_t>(a_ + r * units, lam_[r], om1, beta_, lo, hi, out_ + r * units,
                                units);
      }
    };
    const int64_t grain = std::max<int64_t>(1, 32768 / units);
    if (tokens <= grain) {
      rows(0, tokens);  // small: skip the thread pool's bookkeeping
    } else {
      at::parallel_for(0, tokens, grain, rows);
    }
  });
  return THPVariable_Wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}

// A piecewise-linear map per unit (actsteer.transport.KnotTransport) as the loops read it:
// knots x (K, units) and per segment s − 1 and y − x (K − 1, units), level-major, in float32;
// the bounds in the outputs' dtype.
struct KnotMap {
  at::ScalarType dtype;
  int64_t units;
  int64_t knots;
  const float* x;
  const float* slope_minus_one;
  const float* shift;
  const void* lo;
  const void* hi;
};

// The knot map of these tensors, or nothing when the kernel cannot read them.
std::optional<KnotMap> read_knots(const at::Tensor& x, const at::Tensor& slope_minus_one,
                                  const at::Tensor& shift, const at::Tensor& lo,
                                  const at::Tensor& hi) {
  const auto bounds = read_map(lo, hi, lo, hi, 0);  // lo, hi: one floating dtype, CPU, contiguous
  if (!bounds || x.dim() != 2) {
    return std::nullopt;
  }
  for (const auto* t : {&x, &slope_minus_one, &shift}) {
    if (t->scalar_type() != at::kFloat || !t->device().is_cpu() || !t->is_contiguous()) {
      return std::nullopt;
    }
  }
  const int64_t units = bounds->units, knots = x.size(0);
  if (knots < 2 || x.size(1) != units || slope_minus_one.numel() != units * (knots - 1) ||
      shift.numel() != units * (knots - 1)) {
    return std::nullopt;
  }
  return KnotMap{bounds->dtype,
                 units,
                 knots,
                 x.const_data_ptr<float>(),
                 slope_minus_one.const_data_ptr<float>(),
                 shift.const_data_ptr<float>(),
                 bounds->lo,
                 bounds->hi};
}

// The map of `a` (its units last, contiguous, `map.dtype`) into a new tensor, at one λ (`lams`
// = 1) or one per `tokens / lams` consecutive rows of units (a row's tokens, or each token).
// Each element's segment is the count of interior knots ≤ it (counted a level at a time over
// the row's units, which vectorizes), then out = a + (λ · ((y_k − x_k) + (s_k − 1)(a − x_k)))
// in float32 rounded to a's dtype, inside the open bounds: the same operations, in the same
// order, as KnotTransport's torch ops.
at::Tensor knots_moved(const KnotMap& map, const at::Tensor& a, const float* lam, int64_t lams) {
  const int64_t units = map.units, knots = map.knots;
  const int64_t tokens = a.numel() / units;
  const int64_t per_lam = tokens / lams;
  at::Tensor out = at::detail::empty_cpu(a.sizes(), map.dtype);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, map.dtype, "actsteer_knots", [&] {
    const auto* a_ = a.const_data_ptr<scalar_t>();
    auto* out_ = out.mutable_data_ptr<scalar_t>();
    const auto* lo = static_cast<const scalar_t*>(map.lo);
    const auto* hi = static_cast<const scalar_t*>(map.hi);
    const auto rows = [&](int64_t begin, int64_t end) {
      std::vector<int32_t> segment(units);
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* row = a_ + r * units;
        count_at_or_above<scalar_t>(row, map.x, segment.data(), units, knots);
        const float l = lam[r / per_lam];
        for (int64_t u = 0; u < units; ++u) {
          const int64_t p = segment[u] * units + u;
          const float v = static_cast<float>(row[u]);
          const float change = map.shift[p] + map.slope_minus_one[p] * (v - map.x[p]);
          const scalar_t moved = row[u] + static_cast<scalar_t>(l * change);
          const bool inside = (row[u] > lo[u]) & (row[u] < hi[u]);
          out_[r * units + u] = inside ? moved : row[u];
        }
      }
    };
    const int64_t grain = std::max<int64_t>(1, 32768 / units);
    if (tokens <= grain) {
      rows(0, tokens);  // small: skip the thread pool's bookkeeping
    } else {
      at::parallel_for(0, tokens, grain, rows);
    }
  });
  return out;
}

// Whether the knot kernel takes `a` at `lams` strengths: a 2- or 3-D contiguous CPU tensor of
// the map's dtype, units last, no gradient to carry, and one λ or one per row or token.
bool knots_fit(const KnotMap& map, const at::Tensor& a, int64_t lams) {
  const int64_t dims = a.dim();
  if (dims < 2 || dims > 3 || a.scalar_type() != map.dtype || !a.device().is_cpu() ||
      !a.is_contiguous() || (a.requires_grad() && at::GradMode::is_enabled()) ||
      a.size(dims - 1) != map.units || a.numel() == 0) {
    return false;
  }
  const int64_t tokens = a.numel() / map.units;
  return lams == 1 || lams == a.size(0) || lams == tokens;
}

// knot_tokens(x, slope_minus_one, shift, lo, hi, lam, a): `knots_moved` of a (tokens, units)
// tensor at one λ or one per token; a new tensor, or None where the kernel does not apply.
PyObject* knot_tokens_fastcall(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 7) {
    PyErr_Format(PyExc_TypeError, "knot_tokens() takes 7 arguments (%zd given)", nargs);
    return nullptr;
  }
  if (!plain_tensors(args, {0, 1, 2, 3, 4, 5, 6})) {
    Py_RETURN_NONE;
  }
  const at::Tensor& lam = THPVariable_Unpack(args[5]);
  const at::Tensor& a = THPVariable_Unpack(args[6]);
  const auto map = read_knots(THPVariable_Unpack(args[0]), THPVariable_Unpack(args[1]),
                              THPVariable_Unpack(args[2]), THPVariable_Unpack(args[3]),
                              THPVariable_Unpack(args[4]));
  if (!map || a.dim() != 2 || lam.scalar_type() != at::kFloat || !lam.device().is_cpu() ||
      !lam.is_contiguous() || (lam.numel() != 1 && lam.numel() != a.size(0)) ||
      !knots_fit(*map, a, lam.numel())) {
    Py_RETURN_NONE;
  }
  return THPVariable_Wrap(knots_moved(*map, a, lam.const_data_ptr<float>(), lam.numel()));
  END_HANDLE_TH_ERRORS
}

// A forward hook with its map bound (see hook() below); it holds the parameter tensors whose
// memory the map reads.
struct BoundHook {
  static constexpr const char* kName = "actsteer.BoundHook";
  torch::Tensor scale, shift, lo, hi;
  Map map;
  bool in_place;
  PyObject* fallback;  // the Python hook, for every output the kernel does not take (owned)
  ~BoundHook() { Py_XDECREF(fallback); }
};

template <typename Bound>
void free_hook(PyObject* capsule) {
  delete static_cast<Bound*>(PyCapsule_GetPointer(capsule, Bound::kName));
}

// A Python callable running `def` with `bound` (which it owns, through a capsule) as its self;
// nullptr, with `bound` deleted, where the capsule cannot be made.
template <typename Bound>
PyObject* hook_of(Bound* bound, PyMethodDef* def) {
  PyObject* capsule = PyCapsule_New(bound, Bound::kName, free_hook<Bound>);
  if (capsule == nullptr) {
    delete bound;
    return nullptr;
  }
  PyObject* hook = PyCFunction_New(def, capsule);
  Py_DECREF(capsule);
  return hook;
}

// hook(module, args, output), as PyTorch calls a forward hook.
PyObject* bound_hook_call(PyObject* capsule, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  const auto* bound = static_cast<BoundHook*>(PyCapsule_GetPointer(capsule, BoundHook::kName));
  if (nargs == 3 && THPVariable_CheckExact(args[2]) &&
      fits(bound->map, THPVariable_Unpack(args[2]))) {
    return transported(bound->map, args[2], bound->in_place);
  }
  return PyObject_Vectorcall(bound->fallback, args, nargs, nullptr);
  END_HANDLE_TH_ERRORS
}

PyMethodDef bound_hook_def = {
    "steering_hook", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(bound_hook_call)),
    METH_FASTCALL, "A steering forward hook: hook(module, args, output)"};

// hook(scale, shift, lo, hi, rows, in_place, fallback): a forward hook that transports
// a plain tensor output in this kernel, with no Python frame on the way, and hands any other
// output (or one the kernel declines) to fallback(module, args, output). None where the
// kernel cannot read the parameters (see read_map).
PyObject* hook_fastcall(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  int64_t rows = 0;
  bool in_place = false;
  if (!read_rows_in_place("hook", args, nargs, rows, in_place)) {
    return nullptr;
  }
  if (!plain_tensors(args, {0, 1, 2, 3}) || !PyCallable_Check(args[6])) {
    PyErr_SetString(PyExc_TypeError,
                    "hook() takes plain tensors for scale, shift, lo and hi, and a callable "
                    "fallback last");
    return nullptr;
  }
  const auto map = map_of(args, rows);
  if (!map) {
    Py_RETURN_NONE;
  }
  auto* bound = new BoundHook{THPVariable_Unpack(args[0]),
                              THPVariable_Unpack(args[1]),
                              THPVariable_Unpack(args[2]),
                              THPVariable_Unpack(args[3]),
                              *map,
                              in_place,
                              args[6]};
  Py_INCREF(bound->fallback);
  return hook_of(bound, &bound_hook_def);
  END_HANDLE_TH_ERRORS
}

// A forward hook with a knot map and its λ (one, or one per row) bound; it holds the tensors
// whose memory it reads.
struct KnotHook {
  static constexpr const char* kName = "actsteer.KnotHook";
  torch::Tensor x, slope_minus_one, shift, lo, hi, lam;
  KnotMap map;
  PyObject* fallback;  // owned
  ~KnotHook() { Py_XDECREF(fallback); }
};

// hook(module, args, output) of a knot map: `knots_moved` of a plain tensor output it fits,
// the fallback for everything else.
PyObject* knot_hook_call(PyObject* capsule, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  const auto* bound = static_cast<KnotHook*>(PyCapsule_GetPointer(capsule, KnotHook::kName));
  const int64_t lams = bound->lam.numel();
  if (nargs == 3 && THPVariable_CheckExact(args[2])) {
    const at::Tensor& a = THPVariable_Unpack(args[2]);
    if (knots_fit(bound->map, a, lams) && (lams == 1 || lams == a.size(0))) {
      return THPVariable_Wrap(
          knots_moved(bound->map, a, bound->lam.const_data_ptr<float>(), lams));
    }
  }
  return PyObject_Vectorcall(bound->fallback, args, nargs, nullptr);
  END_HANDLE_TH_ERRORS
}

PyMethodDef knot_hook_def = {
    "knot_steering_hook",
    reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(knot_hook_call)), METH_FASTCALL,
    "A steering forward hook of a knot map: hook(module, args, output)"};

// knot_hook(x, slope_minus_one, shift, lo, hi, lam, fallback): a forward hook moving a plain
// tensor output by the knot map at λ (float32, one or one per row) with no Python frame on
// the way, fallback(module, args, output) for the rest; None where the kernel cannot read
// the parameters.
PyObject* knot_hook_fastcall(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 7) {
    PyErr_Format(PyExc_TypeError, "knot_hook() takes 7 arguments (%zd given)", nargs);
    return nullptr;
  }
  if (!plain_tensors(args, {0, 1, 2, 3, 4, 5}) || !PyCallable_Check(args[6])) {
    PyErr_SetString(PyExc_TypeError,
                    "knot_hook() takes plain tensors for the map and λ, and a callable fallback");
    return nullptr;
  }
  const at::Tensor& lam = THPVariable_Unpack(args[5]);
  const auto map = read_knots(THPVariable_Unpack(args[0]), THPVariable_Unpack(args[1]),
                              THPVariable_Unpack(args[2]), THPVariable_Unpack(args[3]),
                              THPVariable_Unpack(args[4]));
  if (!map || lam.scalar_type() != at::kFloat || !lam.device().is_cpu() ||
      !lam.is_contiguous() || lam.dim() > 1 || lam.numel() == 0) {
    Py_RETURN_NONE;
  }
  auto* bound = new KnotHook{THPVariable_Unpack(args[0]), THPVariable_Unpack(args[1]),
                             THPVariable_Unpack(args[2]), THPVariable_Unpack(args[3]),
                             THPVariable_Unpack(args[4]), lam,
                             *map,                        args[6]};
  Py_INCREF(bound->fallback);
  return hook_of(bound, &knot_hook_def);
  END_HANDLE_TH_ERRORS
}

// A gated forward hook (see gated_hook() below): the map as transport_tokens reads it, the
// gate's folded weight and bias (z = w·a + b is already (s − θ)/τ), λ (one, or one per row),
// the gate's kind, and the Python gate source (actsteer.sources.Gated) whose carried sums it
// updates and whose `last` it sets.
struct GatedHook {
  static constexpr const char* kName = "actsteer.GatedHook";
  torch::Tensor omega_minus_one, beta, lo, hi, weight, lam;
  float bias;
  int kind;  // 0 token, 1 context, 2 prompt
  int64_t units;
  at::ScalarType dtype;
  PyObject* source;    // owned
  PyObject* fallback;  // owned
  ~GatedHook() {
    Py_XDECREF(source);
    Py_XDECREF(fallback);
  }
};

// A float32 CPU contiguous tensor of n elements held in attribute `name` of `owner`, or
// nothing (the attribute is None, absent or another tensor); a new reference in `held`.
std::optional<at::Tensor> carried(PyObject* owner, const char* name, int64_t n, PyObject*& held) {
  held = PyObject_GetAttrString(owner, name);
  if (held == nullptr) {
    PyErr_Clear();
    return std::nullopt;
  }
  if (!THPVariable_CheckExact(held)) {
    return std::nullopt;
  }
  const at::Tensor& t = THPVariable_Unpack(held);
  if (t.scalar_type() != at::kFloat || !t.device().is_cpu() || !t.is_contiguous() ||
      t.numel() != n || t.requires_grad()) {
    return std::nullopt;
  }
  return t;
}

// Whether this pass is one the gated kernel takes for a context or prompt gate: the gate
// source has a pass phase, and it says the pass continues generation (not a prompt pass).
bool generated_pass(PyObject* source) {
  PyObject* phase = PyObject_GetAttrString(source, "phase");
  if (phase == nullptr) {
    PyErr_Clear();
    return false;
  }
  bool generated = false;
  if (phase != Py_None) {
    PyObject* prompt = PyObject_GetAttrString(phase, "prompt");
    if (prompt == nullptr) {
      PyErr_Clear();
    } else {
      generated = PyObject_IsTrue(prompt) == 0;
      Py_DECREF(prompt);
    }
  }
  Py_DECREF(phase);
  return generated;
}

// hook(module, args, output) of a gated steering: per token z = w·a + b (a context gate's
// running mean of z carried on from the row's sums, a prompt gate's prompt mean held),
// g = σ(z), and the transport at λ·g, as actsteer.sources.Gated and the transport compute it
// in torch ops (the dot product summed in another order: float32 rounding apart). Prompt
// passes of context and prompt gates, and every output it declines, go to the fallback.
PyObject* gated_hook_call(PyObject* capsule, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  const auto* bound = static_cast<GatedHook*>(PyCapsule_GetPointer(capsule, GatedHook::kName));
  if (nargs != 3 || !THPVariable_CheckExact(args[2])) {
    return PyObject_Vectorcall(bound->fallback, args, nargs, nullptr);
  }
  const at::Tensor& a = THPVariable_Unpack(args[2]);
  const int64_t dims = a.dim();
  const bool sequence = dims == 3;
  if (!(dims == 2 || sequence) || a.scalar_type() != bound->dtype || !a.device().is_cpu() ||
      !a.is_contiguous() || a.size(-1) != bound->units || a.numel() == 0 ||
      (a.requires_grad() && at::GradMode::is_enabled()) ||
      (bound->kind != 0 && (!sequence || !generated_pass(bound->source)))) {
    return PyObject_Vectorcall(bound->fallback, args, nargs, nullptr);
  }
  const int64_t rows = a.size(0), tokens = sequence ? a.size(1) : 1;
  const bool per_row = bound->lam.dim() == 1;
  if (per_row && bound->lam.numel() != rows) {
    return PyObject_Vectorcall(bound->fallback, args, nargs, nullptr);
  }
  PyObject* total_obj = nullptr;
  PyObject* count_obj = nullptr;
  std::optional<at::Tensor> total, count;
  if (bound->kind != 0) {
    total = carried(bound->source, "total", rows, total_obj);
    count = carried(bound->source, "count", rows, count_obj);
    if (!total || !count) {  // the fallback raises its error where rows changed
      Py_XDECREF(total_obj);
      Py_XDECREF(count_obj);
      return PyObject_Vectorcall(bound->fallback, args, nargs, nullptr);
    }
  }
  at::Tensor out = at::detail::empty_cpu(a.sizes(), bound->dtype);
  at::Tensor gates = at::detail::empty_cpu(
      sequence ? at::IntArrayRef{rows, tokens} : at::IntArrayRef{rows}, at::kFloat);
  const int64_t units = bound->units;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, bound->dtype, "actsteer_gated", [&] {
    const auto* a_ = a.const_data_ptr<scalar_t>();
    auto* out_ = out.mutable_data_ptr<scalar_t>();
    auto* g_ = gates.mutable_data_ptr<float>();
    const auto* w = bound->weight.const_data_ptr<float>();
    const auto* lam = bound->lam.const_data_ptr<float>();
    const auto* om1 = bound->omega_minus_one.const_data_ptr<float>();
    const auto* beta = bound->beta.const_data_ptr<float>();
    const auto* lo = bound->lo.const_data_ptr<scalar_t>();
    const auto* hi = bound->hi.const_data_ptr<scalar_t>();
    float* total_ = total ? total->mutable_data_ptr<float>() : nullptr;
    float* count_ = count ? count->mutable_data_ptr<float>() : nullptr;
    const auto steer_rows = [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        for (int64_t t = 0; t < tokens; ++t) {
          const int64_t index = r * tokens + t;
          const scalar_t* x = a_ + index * units;
          float z = 0.0f;
          if (bound->kind != 2) {
            for (int64_t k = 0; k < units; ++k) {
              z += static_cast<float>(x[k]) * w[k];
            }
            z += bound->bias;
          }
          if (bound->kind == 1) {
            total_[r] += z;
            count_[r] += 1.0f;
            z = total_[r] / count_[r];
          } else if (bound->kind == 2) {
            z = total_[r] / std::max(count_[r], 1.0f);
          }
          const float g = 1.0f / (1.0f + std::exp(-z));
          g_[index] = g;
          transport_row<scalar_t>(x, g * lam[per_row ? r : 0], om1, beta, lo, hi,
                                  out_ + index * units, units);
        }
      }
    };
    if (rows * tokens * units <= 32768) {
      steer_rows(0, rows);  // small: skip the thread pool's bookkeeping
    } else {
      at::parallel_for(0, rows, 1, steer_rows);
    }
  });
  Py_XDECREF(total_obj);
  Py_XDECREF(count_obj);
  if (total) {
    total->unsafeGetTensorImpl()->bump_version();
    count->unsafeGetTensorImpl()->bump_version();
  }
  PyObject* last = THPVariable_Wrap(std::move(gates));
  if (last == nullptr || PyObject_SetAttrString(bound->source, "last", last) < 0) {
    Py_XDECREF(last);
    return nullptr;
  }
  Py_DECREF(last);
  return THPVariable_Wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}

PyMethodDef gated_hook_def = {
    "gated_steering_hook",
    reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(gated_hook_call)), METH_FASTCALL,
    "A gated steering forward hook: hook(module, args, output)"};

// gated_hook(omega_minus_one, beta, lo, hi, weight, bias, lam, kind, source, fallback): a
// forward hook computing the gate and the transport at λ·g in this kernel (see
// gated_hook_call), fallback(module, args, output) for the rest. ω − 1, β, the gate's weight
// and bias and λ in float32, the bounds in the outputs' dtype; kind 0 token, 1 context,
// 2 prompt; source: the gate source whose `total`, `count` and `last` it reads and writes.
// None where the kernel cannot read the parameters.
PyObject* gated_hook_fastcall(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 10) {
    PyErr_Format(PyExc_TypeError, "gated_hook() takes 10 arguments (%zd given)", nargs);
    return nullptr;
  }
  if (!plain_tensors(args, {0, 1, 2, 3, 4, 5, 6}) || !PyCallable_Check(args[9])) {
    PyErr_SetString(PyExc_TypeError,
                    "gated_hook() takes plain tensors first, then kind, the gate source and "
                    "a callable fallback");
    return nullptr;
  }
  const long kind = PyLong_AsLong(args[7]);
  if (kind == -1 && PyErr_Occurred()) {
    return nullptr;
  }
  const at::Tensor& lo = THPVariable_Unpack(args[2]);
  const auto bounds = read_map(lo, THPVariable_Unpack(args[3]), lo, THPVariable_Unpack(args[3]), 0);
  const int64_t units = bounds ? bounds->units : 0;
  bool readable = bounds.has_value() && kind >= 0 && kind <= 2;
  for (const int i : {0, 1, 4, 5, 6}) {
    const at::Tensor& t = THPVariable_Unpack(args[i]);
    readable = readable && t.scalar_type() == at::kFloat && t.device().is_cpu() &&
               t.is_contiguous() && t.numel() > 0 &&
               (i == 5 || i == 6 || t.numel() == units);
  }
  if (!readable || THPVariable_Unpack(args[5]).numel() != 1 ||
      THPVariable_Unpack(args[6]).dim() > 1) {
    Py_RETURN_NONE;
  }
  auto* bound = new GatedHook{THPVariable_Unpack(args[0]),
                              THPVariable_Unpack(args[1]),
                              lo,
                              THPVariable_Unpack(args[3]),
                              THPVariable_Unpack(args[4]),
                              THPVariable_Unpack(args[6]),
                              THPVariable_Unpack(args[5]).item<float>(),
                              static_cast<int>(kind),
                              units,
                              bounds->dtype,
                              args[8],
                              args[9]};
  Py_INCREF(bound->source);
  Py_INCREF(bound->fallback);
  return hook_of(bound, &gated_hook_def);
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"transport", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(transport_fastcall)),
     METH_FASTCALL,
     "transport(scale, shift, lo, hi, rows, in_place, a): affine map inside the open per-unit "
     "bounds, identity outside, optionally in place; None where the kernel does not apply"},
    {"transport_tokens",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(transport_tokens_fastcall)),
     METH_FASTCALL,
     "transport_tokens(omega_minus_one, beta, lo, hi, lam, a): the map at one λ per row of a "
     "(tokens, units) tensor; None where the kernel does not apply"},
    {"knot_tokens",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(knot_tokens_fastcall)),
     METH_FASTCALL,
     "knot_tokens(x, slope_minus_one, shift, lo, hi, lam, a): a piecewise-linear map per unit at "
     "one λ per row of a (tokens, units) tensor; None where the kernel does not apply"},
    {"knot_hook",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(knot_hook_fastcall)),
     METH_FASTCALL,
     "knot_hook(x, slope_minus_one, shift, lo, hi, lam, fallback): a forward hook running "
     "knot_tokens' map on tensor outputs at λ (one, or one per row), fallback(module, args, "
     "output) for the rest; None where the kernel cannot read the parameters"},
    {"hook", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(hook_fastcall)),
     METH_FASTCALL,
     "hook(scale, shift, lo, hi, rows, in_place, fallback): a forward hook running "
     "transport() on tensor outputs, fallback(module, args, output) for the rest; None where "
     "the kernel cannot read the parameters"},
    {"gated_hook",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(gated_hook_fastcall)),
     METH_FASTCALL,
     "gated_hook(omega_minus_one, beta, lo, hi, weight, bias, lam, kind, source, fallback): a "
     "forward hook computing a gate and the transport at λ·g; None where the kernel cannot "
     "read the parameters"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  if (PyModule_AddFunctions(m.ptr(), methods) < 0) {
    throw pybind11::error_already_set();
  }
}
