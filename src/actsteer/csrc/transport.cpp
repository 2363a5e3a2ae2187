// The steering hook's bounded-support transport as one CPU pass (see actsteer/kernels.py):
// out = fma(a, scale, shift) where lo <= a <= hi, a elsewhere, and rows before `first_row`
// copied unchanged (the unconditional half of a classifier-free-guidance batch).
//
// Layout: `lo` and `hi` hold one value per unit, units = the trailing lo.numel() elements of
// each row of `a`; `scale` and `shift` hold the same units once (shared) or once per steered
// batch row (per-row strength). The affine part rounds once (fma in the dtype's math type),
// as torch.addcmul does on CPU.
#include <torch/extension.h>

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

namespace {

template <typename T>
void transport_run(const T* __restrict__ a, const T* __restrict__ scale, const T* __restrict__ shift,
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

}  // namespace

torch::Tensor bounded_transport(const torch::Tensor& a, const torch::Tensor& scale,
                                const torch::Tensor& shift, const torch::Tensor& lo,
                                const torch::Tensor& hi, int64_t first_row) {
  const int64_t units = lo.numel();
  const int64_t batch = a.dim() > 0 ? a.size(0) : 0;
  TORCH_CHECK(a.device().is_cpu() && a.is_contiguous(), "a must be a contiguous CPU tensor");
  for (const auto* t : {&scale, &shift, &lo, &hi}) {
    TORCH_CHECK(t->is_contiguous() && t->scalar_type() == a.scalar_type() && t->device().is_cpu(),
                "scale, shift and bounds must be contiguous CPU tensors of a's dtype");
  }
  TORCH_CHECK(units > 0 && hi.numel() == units && batch > 0 && a.numel() % (batch * units) == 0,
              "a's rows must hold whole multiples of the bounds' units");
  TORCH_CHECK(first_row >= 0 && first_row < batch, "first_row out of range");
  const int64_t steered = batch - first_row;
  const bool per_row = scale.numel() != units;
  TORCH_CHECK(shift.numel() == scale.numel() && (!per_row || scale.numel() == steered * units),
              "scale and shift need one value per unit, or one per unit and steered row");
  const int64_t rows = a.numel() / units;  // runs of `units` elements
  const int64_t rows_per_batch = rows / batch;
  const int64_t first = first_row * rows_per_batch;

  auto out = torch::empty_like(a);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "bounded_transport", [&] {
    const scalar_t* a_ = a.const_data_ptr<scalar_t>();
    const scalar_t* scale_ = scale.const_data_ptr<scalar_t>();
    const scalar_t* shift_ = shift.const_data_ptr<scalar_t>();
    const scalar_t* lo_ = lo.const_data_ptr<scalar_t>();
    const scalar_t* hi_ = hi.const_data_ptr<scalar_t>();
    scalar_t* out_ = out.mutable_data_ptr<scalar_t>();
    if (first > 0) {
      std::copy(a_, a_ + first * units, out_);
    }
    const int64_t grain = std::max<int64_t>(1, 32768 / units);
    at::parallel_for(first, rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t p = per_row ? ((r - first) / rows_per_batch) * units : 0;
        transport_run<scalar_t>(a_ + r * units, scale_ + p, shift_ + p, lo_, hi_, out_ + r * units,
                                units);
      }
    });
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("bounded_transport", &bounded_transport, "Affine map inside per-unit bounds, identity outside");
}
