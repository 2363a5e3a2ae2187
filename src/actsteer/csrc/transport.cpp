// The steering hook's bounded-support transport as one CPU pass (see actsteer/kernels.py):
// out = fma(a, scale, shift) where lo <= a <= hi, a elsewhere, and rows before `first_row`
// copied unchanged (the unconditional half of a classifier-free-guidance batch).
//
// `lo` and `hi` hold one value per unit; `scale` and `shift` the same units once (shared) or
// once per steered batch row (per-row strength). The affine part rounds once (fma in the
// dtype's math type), as torch.addcmul does on CPU. An unbounded support passes ±inf bounds.
#include <torch/extension.h>

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

namespace {

// Units along the last axis: every run of n elements has its own scale, shift and bounds.
template <typename T>
void transport_units(const T* __restrict__ a, const T* __restrict__ scale, const T* __restrict__ shift,
                     const T* __restrict__ lo, const T* __restrict__ hi, T* __restrict__ out,
                     int64_t n) {
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
void transport_channel(const T* __restrict__ a, T scale, T shift, T lo, T hi, T* __restrict__ out,
                       int64_t n) {
  using Math = at::opmath_type<T>;
  const Math s = scale, b = shift, l = lo, h = hi;
  for (int64_t k = 0; k < n; ++k) {
    const Math v = static_cast<Math>(a[k]);
    const Math moved = std::fma(v, s, b);
    out[k] = (v >= l) & (v <= h) ? static_cast<T>(moved) : a[k];
  }
}

}  // namespace

// a: (batch, ..., units, inner) contiguous; inner = 1 for units on the last axis, H×W for a
// per-channel map on (B, C, H, W). Rows of the batch before first_row are copied unchanged.
torch::Tensor bounded_transport(const torch::Tensor& a, const torch::Tensor& scale,
                                const torch::Tensor& shift, const torch::Tensor& lo,
                                const torch::Tensor& hi, int64_t first_row, int64_t inner) {
  const int64_t units = lo.numel();
  const int64_t batch = a.dim() > 0 ? a.size(0) : 0;
  TORCH_CHECK(a.device().is_cpu() && a.is_contiguous(), "a must be a contiguous CPU tensor");
  for (const auto* t : {&scale, &shift, &lo, &hi}) {
    TORCH_CHECK(t->is_contiguous() && t->scalar_type() == a.scalar_type() && t->device().is_cpu(),
                "scale, shift and bounds must be contiguous CPU tensors of a's dtype");
  }
  TORCH_CHECK(units > 0 && inner > 0 && hi.numel() == units && batch > 0 &&
                  a.numel() % (batch * units * inner) == 0,
              "a's rows must hold whole multiples of units × inner elements");
  TORCH_CHECK(first_row >= 0 && first_row < batch, "first_row out of range");
  const int64_t steered = batch - first_row;
  const bool per_row = scale.numel() != units;
  TORCH_CHECK(shift.numel() == scale.numel() && (!per_row || scale.numel() == steered * units),
              "scale and shift need one value per unit, or one per unit and steered row");
  const int64_t run = inner == 1 ? units : inner;  // elements sharing one parameter layout
  const int64_t runs = a.numel() / run;
  const int64_t runs_per_row = runs / batch;
  const int64_t first = first_row * runs_per_row;

  auto out = torch::empty_like(a);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "bounded_transport", [&] {
    const scalar_t* a_ = a.const_data_ptr<scalar_t>();
    const scalar_t* scale_ = scale.const_data_ptr<scalar_t>();
    const scalar_t* shift_ = shift.const_data_ptr<scalar_t>();
    const scalar_t* lo_ = lo.const_data_ptr<scalar_t>();
    const scalar_t* hi_ = hi.const_data_ptr<scalar_t>();
    scalar_t* out_ = out.mutable_data_ptr<scalar_t>();
    std::copy(a_, a_ + first * run, out_);
    const int64_t grain = std::max<int64_t>(1, 32768 / run);
    at::parallel_for(first, runs, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t row = per_row ? ((r - first) / runs_per_row) * units : 0;
        if (inner == 1) {
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("bounded_transport", &bounded_transport,
        "Affine map inside per-unit bounds, identity outside; rows before first_row unchanged");
}
