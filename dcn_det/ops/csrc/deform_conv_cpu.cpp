// Deformable convolution (DCNv1 / DCNv2) on the CPU: bilinear im2col, the GEMMs through ATen's convolution
// (oneDNN) and matmul, and a fused col2im that also produces the offset and mask gradients. Public ATen API
// only. (On AMD CPUs MKL's sgemm, behind at::mm, does not use AVX-512; oneDNN's convolution does, and it is
// a GEMM when the columns are seen as rows of an image convolved by a 1xK kernel with stride K.)
//
// Semantics are mmcv's (modulated_deform_conv / deform_conv CPU and CUDA kernels): a sample at (h, w)
// counts only when -1 < h < H and -1 < w < W; it reads the corners (floor(h), floor(w)) .. +1, a corner
// outside the image reading 0; the offset gradient is the derivative of that interpolant with the corners
// held fixed (one-sided at integer positions). Tensors (channels-last where it matters):
//   x      (N, H, W, C)            input, one row of C channels per pixel
//   offset (N, Ho, Wo, DG, K, 2)   (dy, dx) per output pixel, offset group and kernel point
//   mask   (N, Ho, Wo, DG, K)      modulation (DCNv2), or undefined (DCNv1)
//   cols   (Pc, K, C)              the sampled columns of Pc output pixels; viewed as a batch of output rows,
//                                  (Rc, C, 1, Wo*K) channels-last, a conv with kernel (1, K) and stride (1, K)
//                                  and the weight viewed as (C_out, C/G, 1, K) is the deformable conv
// The inner loops are plain C++ compiled for AVX-512, AVX2 and baseline x86-64 (target_clones): the loader
// picks the widest the CPU has at run time, so one build runs on every x86-64 CPU.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(DCN_NO_CLONES)
#define DCN_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DCN_CLONES
#endif

// dst[i] = wa a[i] + wb b[i] + wc c[i] + wd d[i]
template <typename T>
inline void bilinear4_impl(T* __restrict dst, const T* a, const T* b, const T* c, const T* d, T wa, T wb,
                           T wc, T wd, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = wa * a[i] + wb * b[i] + wc * c[i] + wd * d[i];
}
DCN_CLONES void bilinear4(float* __restrict dst, const float* a, const float* b, const float* c,
                          const float* d, float wa, float wb, float wc, float wd, int64_t n) {
  bilinear4_impl(dst, a, b, c, d, wa, wb, wc, wd, n);
}
DCN_CLONES void bilinear4(double* __restrict dst, const double* a, const double* b, const double* c,
                          const double* d, double wa, double wb, double wc, double wd, int64_t n) {
  bilinear4_impl(dst, a, b, c, d, wa, wb, wc, wd, n);
}

// ga[i] += wa g[i] (likewise b, c, d) and s = (<g, a>, <g, b>, <g, c>, <g, d>)
template <typename T>
inline void scatter4_dot4_impl(const T* __restrict g, T* __restrict ga, T* __restrict gb, T* __restrict gc,
                               T* __restrict gd, const T* a, const T* b, const T* c, const T* d, T wa, T wb,
                               T wc, T wd, int64_t n, T* s) {
  T sa = 0, sb = 0, sc = 0, sd = 0;
#pragma omp simd reduction(+ : sa, sb, sc, sd)
  for (int64_t i = 0; i < n; ++i) {
    const T gi = g[i];
    ga[i] += wa * gi;
    gb[i] += wb * gi;
    gc[i] += wc * gi;
    gd[i] += wd * gi;
    sa += gi * a[i];
    sb += gi * b[i];
    sc += gi * c[i];
    sd += gi * d[i];
  }
  s[0] += sa;
  s[1] += sb;
  s[2] += sc;
  s[3] += sd;
}
DCN_CLONES void scatter4_dot4(const float* __restrict g, float* __restrict ga, float* __restrict gb,
                              float* __restrict gc, float* __restrict gd, const float* a, const float* b,
                              const float* c, const float* d, float wa, float wb, float wc, float wd, int64_t n,
                              float* s) {
  scatter4_dot4_impl(g, ga, gb, gc, gd, a, b, c, d, wa, wb, wc, wd, n, s);
}
DCN_CLONES void scatter4_dot4(const double* __restrict g, double* __restrict ga, double* __restrict gb,
                              double* __restrict gc, double* __restrict gd, const double* a, const double* b,
                              const double* c, const double* d, double wa, double wb, double wc, double wd,
                              int64_t n, double* s) {
  scatter4_dot4_impl(g, ga, gb, gc, gd, a, b, c, d, wa, wb, wc, wd, n, s);
}

struct Geometry {
  int64_t n, c, h, w;        // input
  int64_t c_out, kh, kw, k;  // weight
  int64_t ho, wo;            // output
  int64_t sh, sw, ph, pw, dh, dw;
  int64_t g, dg, cd;  // groups, offset groups, channels per offset group
};

// One bilinear sample: the rows of its four corners (top-left, top-right, bottom-left, bottom-right) and
// their weights; a corner outside the image (or a sample outside the open box) points at a zero row.
template <typename T>
struct Sample {
  const T* row[4];
  int64_t index[4];  // pixel index n*H*W + y*W + x of each corner, -1 outside
  T weight[4];       // bilinear weights (without the mask)
  T lh, lw;          // fractional position
  bool inside;
};

template <typename T>
inline Sample<T> sample(const T* x, const T* zero, const Geometry& s, int64_t n, int64_t y, int64_t xo, int64_t ki,
                        int64_t dg_i, T off_h, T off_w) {
  Sample<T> out;
  const int64_t i = ki / s.kw, j = ki % s.kw;
  // integer grid position first, then the offset (int + float, as mmcv)
  const T h = static_cast<T>(y * s.sh - s.ph + i * s.dh) + off_h;
  const T w = static_cast<T>(xo * s.sw - s.pw + j * s.dw) + off_w;
  out.inside = h > -1 && h < s.h && w > -1 && w < s.w;
  if (!out.inside) {
    for (int q = 0; q < 4; ++q) {
      out.row[q] = zero;
      out.index[q] = -1;
      out.weight[q] = 0;
    }
    out.lh = out.lw = 0;
    return out;
  }
  const T h0f = std::floor(h), w0f = std::floor(w);
  const int64_t h0 = static_cast<int64_t>(h0f), w0 = static_cast<int64_t>(w0f);
  out.lh = h - h0f;
  out.lw = w - w0f;
  const T hh = 1 - out.lh, hw = 1 - out.lw;
  out.weight[0] = hh * hw;
  out.weight[1] = hh * out.lw;
  out.weight[2] = out.lh * hw;
  out.weight[3] = out.lh * out.lw;
  const int64_t ys[4] = {h0, h0, h0 + 1, h0 + 1}, xs[4] = {w0, w0 + 1, w0, w0 + 1};
  for (int q = 0; q < 4; ++q) {
    if (ys[q] >= 0 && ys[q] < s.h && xs[q] >= 0 && xs[q] < s.w) {
      out.index[q] = (n * s.h + ys[q]) * s.w + xs[q];
      out.row[q] = x + out.index[q] * s.c + dg_i * s.cd;
    } else {
      out.index[q] = -1;
      out.row[q] = zero;
    }
  }
  return out;
}

Geometry geometry(const at::Tensor& input, const at::Tensor& weight, int64_t sh, int64_t sw, int64_t ph,
                  int64_t pw, int64_t dh, int64_t dw, int64_t groups, int64_t offset_groups) {
  Geometry s;
  s.n = input.size(0);
  s.c = input.size(1);
  s.h = input.size(2);
  s.w = input.size(3);
  s.c_out = weight.size(0);
  s.kh = weight.size(2);
  s.kw = weight.size(3);
  s.k = s.kh * s.kw;
  s.sh = sh, s.sw = sw, s.ph = ph, s.pw = pw, s.dh = dh, s.dw = dw;
  s.ho = (s.h + 2 * ph - dh * (s.kh - 1) - 1) / sh + 1;
  s.wo = (s.w + 2 * pw - dw * (s.kw - 1) - 1) / sw + 1;
  s.g = groups;
  s.dg = offset_groups;
  s.cd = s.c / offset_groups;
  return s;
}

// Calls f(dg, k, sample index, sample, mask value) for every sample of output pixel gp (over N*Ho*Wo).
template <typename T, typename F>
inline void for_each_sample(const T* x, const T* offset, const T* mask, const T* zero, const Geometry& s, int64_t gp,
                            F&& f) {
  const int64_t hw_out = s.ho * s.wo, n = gp / hw_out, y = (gp % hw_out) / s.wo, xo = gp % s.wo;
  const T* off = offset + gp * s.dg * s.k * 2;
  const T* m = mask ? mask + gp * s.dg * s.k : nullptr;
  for (int64_t dg_i = 0; dg_i < s.dg; ++dg_i) {
    for (int64_t ki = 0; ki < s.k; ++ki) {
      const int64_t si = dg_i * s.k + ki;
      f(dg_i, ki, si, sample(x, zero, s, n, y, xo, ki, dg_i, off[2 * si], off[2 * si + 1]), m ? m[si] : T(1));
    }
  }
}

// cols (Pc, K, C) of the output pixels [p0, p0 + pc)
template <typename T>
void im2col(const T* x, const T* offset, const T* mask, const T* zero, const Geometry& s, int64_t p0, int64_t pc,
            T* cols) {
  at::parallel_for(0, pc, 16, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      for_each_sample(x, offset, mask, zero, s, p0 + p,
                      [&](int64_t dg_i, int64_t ki, int64_t, const Sample<T>& smp, T scale) {
                        bilinear4(cols + (p * s.k + ki) * s.c + dg_i * s.cd, smp.row[0], smp.row[1], smp.row[2],
                                  smp.row[3], smp.weight[0] * scale, smp.weight[1] * scale, smp.weight[2] * scale,
                                  smp.weight[3] * scale, s.cd);
                      });
    }
  });
}

// Transposes im2col for the pixels [p0, p0 + pc): scatters grad_cols (Pc, K, C) into the blocks' private
// input-gradient buffers (no two threads write one buffer) and writes the offset and mask gradients.
template <typename T>
void col2im(const T* x, const T* offset, const T* mask, const T* zero, const Geometry& s, int64_t p0, int64_t pc,
            const T* grad_cols, const std::vector<T*>& grad_x, T* trash, T* grad_offset, T* grad_mask) {
  const int64_t blocks = static_cast<int64_t>(grad_x.size());
  const int64_t step = (pc + blocks - 1) / blocks;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      T* gx = grad_x[b];
      T* bin = trash + b * 4 * s.cd;  // where the corners outside the image write
      for (int64_t p = b * step; p < std::min(pc, (b + 1) * step); ++p) {
        const int64_t gp = p0 + p;
        for_each_sample(x, offset, mask, zero, s, gp, [&](int64_t dg_i, int64_t ki, int64_t si,
                                                          const Sample<T>& smp, T scale) {
          T dots[4] = {0, 0, 0, 0};
          if (smp.inside) {
            T* dst[4];
            for (int q = 0; q < 4; ++q)
              dst[q] = smp.index[q] >= 0 ? gx + smp.index[q] * s.c + dg_i * s.cd : bin + q * s.cd;
            scatter4_dot4(grad_cols + (p * s.k + ki) * s.c + dg_i * s.cd, dst[0], dst[1], dst[2], dst[3],
                          smp.row[0], smp.row[1], smp.row[2], smp.row[3], smp.weight[0] * scale,
                          smp.weight[1] * scale, smp.weight[2] * scale, smp.weight[3] * scale, s.cd, dots);
          }
          if (grad_mask) {
            grad_mask[gp * s.dg * s.k + si] = smp.weight[0] * dots[0] + smp.weight[1] * dots[1] +
                                              smp.weight[2] * dots[2] + smp.weight[3] * dots[3];
          }
          if (grad_offset) {
            // d(value)/dh and /dw of the interpolant, corners fixed: 0 for a sample outside
            const T lh = smp.lh, lw = smp.lw;
            T* go = grad_offset + (gp * s.dg * s.k + si) * 2;
            go[0] = scale * ((1 - lw) * (dots[2] - dots[0]) + lw * (dots[3] - dots[1]));
            go[1] = scale * ((1 - lh) * (dots[1] - dots[0]) + lh * (dots[3] - dots[2]));
          }
        });
      }
    }
  });
}

// Output rows (of Wo pixels) per chunk, so that a column buffer stays under chunk_bytes.
int64_t rows_per_chunk(const Geometry& s, int64_t chunk_bytes, int64_t element) {
  return std::max<int64_t>(1, chunk_bytes / std::max<int64_t>(1, s.wo * s.k * s.c * element));
}

// (A, B, C) -> (A, C, B) contiguous; for weights, whose inner matrices fit in L1, far faster than a strided copy
at::Tensor swap_last2(const at::Tensor& t) {
  auto src = t.contiguous();
  const int64_t a = src.size(0), b = src.size(1), c = src.size(2);
  auto dst = at::empty({a, c, b}, src.options());
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "dcn_det_swap_last2", [&] {
    const scalar_t* sp = src.data_ptr<scalar_t>();
    scalar_t* dp = dst.data_ptr<scalar_t>();
    at::parallel_for(0, a, 1, [&](int64_t a0, int64_t a1) {
      for (int64_t i = a0; i < a1; ++i)
        for (int64_t j = 0; j < b; ++j)
          for (int64_t l = 0; l < c; ++l) dp[(i * c + l) * b + j] = sp[(i * b + j) * c + l];
    });
  });
  return dst;
}

// weight (C_out, C/G, kh, kw) as (C_out, C/G, 1, K) in channels-last memory, the form oneDNN takes without a copy
at::Tensor weight_rows(const at::Tensor& weight, const Geometry& s) {
  return swap_last2(weight.reshape({s.c_out, s.c / s.g, s.k})).view({s.c_out, 1, s.k, s.c / s.g}).permute({0, 3, 1, 2});
}

// A column buffer kept between calls (one per calling thread): buffers of this size come from fresh mmap'd
// pages on every allocation, and faulting them in cost as much as filling them.
at::Tensor column_buffer(int64_t rows, const Geometry& s, const at::TensorOptions& options) {
  static thread_local at::Tensor cache;
  const int64_t numel = rows * s.k * s.c;
  if (!cache.defined() || cache.numel() < numel || cache.scalar_type() != options.dtype().toScalarType())
    cache = at::empty({numel}, options);
  return cache.narrow(0, 0, numel).view({rows, s.k, s.c});
}

// cols (Pc, K, C) of rc output rows as the channels-last image batch (rc, C, 1, Wo*K)
at::Tensor as_rows(const at::Tensor& cols, const Geometry& s, int64_t rc) {
  return cols.view({rc, 1, s.wo * s.k, s.c}).permute({0, 3, 1, 2});
}

void check_inputs(const at::Tensor& input, const at::Tensor& offset, const c10::optional<at::Tensor>& mask,
                  const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  const auto dtype = input.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "dcn_det CPU kernel: float32 or float64 only");
  TORCH_CHECK(input.device().is_cpu(), "dcn_det CPU kernel: CPU tensors only");
  TORCH_CHECK(offset.scalar_type() == dtype && weight.scalar_type() == dtype, "dcn_det CPU kernel: one dtype");
  TORCH_CHECK(!mask || mask->scalar_type() == dtype, "dcn_det CPU kernel: one dtype");
  TORCH_CHECK(!bias || bias->scalar_type() == dtype, "dcn_det CPU kernel: one dtype");
}

}  // namespace

// Returns the output (N, C_out, Ho, Wo) in channels-last memory.
at::Tensor deform_conv2d_forward(const at::Tensor& input, const at::Tensor& offset,
                                 const c10::optional<at::Tensor>& mask, const at::Tensor& weight,
                                 const c10::optional<at::Tensor>& bias, int64_t sh, int64_t sw, int64_t ph,
                                 int64_t pw, int64_t dh, int64_t dw, int64_t groups, int64_t offset_groups,
                                 int64_t chunk_bytes) {
  check_inputs(input, offset, mask, weight, bias);
  const Geometry s = geometry(input, weight, sh, sw, ph, pw, dh, dw, groups, offset_groups);
  auto out = at::empty({s.n, s.ho, s.wo, s.c_out}, input.options());
  const int64_t rows = s.n * s.ho;
  if (rows == 0) return out.permute({0, 3, 1, 2});
  auto x = input.permute({0, 2, 3, 1}).contiguous();
  auto off = offset.permute({0, 2, 3, 1}).contiguous();
  at::Tensor msk = mask ? mask->permute({0, 2, 3, 1}).contiguous() : at::Tensor();
  auto w_rows = weight_rows(weight, s);
  auto out_rows = out.view({rows, s.wo, s.c_out});
  const int64_t step = std::min(rows, rows_per_chunk(s, chunk_bytes, input.element_size()));
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "dcn_det_deform_conv2d_forward", [&] {
    auto zero = at::zeros({s.cd}, input.options());
    auto cols = column_buffer(step * s.wo, s, input.options());
    for (int64_t r0 = 0; r0 < rows; r0 += step) {
      const int64_t rc = std::min(step, rows - r0);
      auto c = cols.narrow(0, 0, rc * s.wo);
      im2col<scalar_t>(x.data_ptr<scalar_t>(), off.data_ptr<scalar_t>(),
                       msk.defined() ? msk.data_ptr<scalar_t>() : nullptr, zero.data_ptr<scalar_t>(), s, r0 * s.wo,
                       rc * s.wo, c.data_ptr<scalar_t>());
      // (rc, C_out, 1, Wo) in channels-last memory: the chunk's rows of output pixels
      const std::vector<int64_t> stride{1, s.k}, pad{0, 0}, dil{1, 1};
      auto o = at::conv2d(as_rows(c, s, rc), w_rows, bias, at::IntArrayRef(stride), at::IntArrayRef(pad),
                          at::IntArrayRef(dil), s.g);
      out_rows.narrow(0, r0, rc).copy_(o.permute({0, 2, 3, 1}).view({rc, s.wo, s.c_out}));
    }
  });
  return out.permute({0, 3, 1, 2});
}

// Gradients of input, offset, mask, weight, bias; an undefined tensor where not asked for.
std::vector<at::Tensor> deform_conv2d_backward(const at::Tensor& grad_out, const at::Tensor& input,
                                               const at::Tensor& offset, const c10::optional<at::Tensor>& mask,
                                               const at::Tensor& weight, bool has_bias, int64_t sh, int64_t sw,
                                               int64_t ph, int64_t pw, int64_t dh, int64_t dw, int64_t groups,
                                               int64_t offset_groups, int64_t chunk_bytes,
                                               std::vector<bool> needs) {
  check_inputs(input, offset, mask, weight, c10::nullopt);
  TORCH_CHECK(needs.size() == 5, "needs: input, offset, mask, weight, bias");
  const bool need_input = needs[0], need_offset = needs[1], need_mask = needs[2] && mask.has_value(),
             need_weight = needs[3], need_bias = needs[4] && has_bias;
  const Geometry s = geometry(input, weight, sh, sw, ph, pw, dh, dw, groups, offset_groups);
  const int64_t rows = s.n * s.ho;
  // channels-last rows of the output gradient: (N*Ho, Wo, C_out)
  auto go = grad_out.to(input.scalar_type()).permute({0, 2, 3, 1}).contiguous().view({rows, s.wo, s.c_out});
  at::Tensor grad_input, grad_offset, grad_mask, grad_weight, grad_bias;
  if (need_bias) grad_bias = go.sum(at::IntArrayRef{0, 1});
  auto x = input.permute({0, 2, 3, 1}).contiguous();
  auto off = offset.permute({0, 2, 3, 1}).contiguous();
  at::Tensor msk = mask ? mask->permute({0, 2, 3, 1}).contiguous() : at::Tensor();
  auto w_rows = weight_rows(weight, s);
  // weight gradient as (C_out, K, C) (the column layout), for one GEMM per chunk when groups == 1
  // (the first chunk writes it, the others add)
  at::Tensor gw = need_weight ? at::empty(s.g == 1 ? at::IntArrayRef{s.c_out, s.k, s.c}
                                                   : at::IntArrayRef{s.c_out, s.c / s.g, 1, s.k},
                                          input.options())
                              : at::Tensor();
  // channels-last accumulators, returned as permuted views
  at::Tensor gx = need_input ? at::zeros({s.n, s.h, s.w, s.c}, input.options()) : at::Tensor();
  at::Tensor goff = need_offset ? at::zeros({s.n, s.ho, s.wo, s.dg * s.k * 2}, input.options()) : at::Tensor();
  at::Tensor gmask = need_mask ? at::zeros({s.n, s.ho, s.wo, s.dg * s.k}, input.options()) : at::Tensor();
  const bool need_cols_grad = need_input || need_offset || need_mask;
  if (rows > 0 && (need_weight || need_cols_grad)) {
    const int64_t step = std::min(rows, rows_per_chunk(s, chunk_bytes, input.element_size()));
    // one input-gradient buffer per block of pixels: blocks run in parallel and never share a buffer. The
    // extra buffers (block 0 writes gx itself) are capped at 256 MiB in all.
    const int64_t image_bytes = s.n * s.h * s.w * s.c * input.element_size();
    int64_t blocks = need_cols_grad ? at::get_num_threads() : 1;
    blocks = std::max<int64_t>(1, std::min<int64_t>(blocks, 1 + (int64_t(256) << 20) / std::max<int64_t>(1, image_bytes)));
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "dcn_det_deform_conv2d_backward", [&] {
      auto zero = at::zeros({s.cd}, input.options());
      auto trash = at::empty({blocks * 4 * s.cd}, input.options());
      std::vector<at::Tensor> extra;
      std::vector<scalar_t*> gx_ptrs;
      at::Tensor gx_sink = gx.defined() ? gx : at::zeros({s.n, s.h, s.w, s.c}, input.options());
      if (need_cols_grad) {
        gx_ptrs.push_back(gx_sink.data_ptr<scalar_t>());
        for (int64_t b = 1; b < blocks; ++b) {
          extra.push_back(at::zeros_like(gx_sink));
          gx_ptrs.push_back(extra.back().data_ptr<scalar_t>());
        }
      }
      auto cols = column_buffer(step * s.wo, s, input.options());
      const scalar_t* xp = x.data_ptr<scalar_t>();
      const scalar_t* op = off.data_ptr<scalar_t>();
      const scalar_t* mp = msk.defined() ? msk.data_ptr<scalar_t>() : nullptr;
      for (int64_t r0 = 0; r0 < rows; r0 += step) {
        const int64_t rc = std::min(step, rows - r0), pc = rc * s.wo;
        auto go_c = go.narrow(0, r0, rc);  // (rc, Wo, C_out)
        auto go_img = go_c.permute({0, 2, 1}).unsqueeze(2);  // (rc, C_out, 1, Wo), channels-last
        if (need_weight) {  // the columns are recomputed rather than kept from the forward, as mmcv does
          auto c = cols.narrow(0, 0, pc);
          im2col<scalar_t>(xp, op, mp, zero.data_ptr<scalar_t>(), s, r0 * s.wo, pc, c.data_ptr<scalar_t>());
          if (s.g == 1) {
            auto gw2d = gw.view({s.c_out, s.k * s.c});
            gw2d.addmm_(go_c.reshape({pc, s.c_out}).t(), c.view({pc, s.k * s.c}), r0 > 0 ? 1 : 0);
          } else {
            auto part = std::get<1>(at::convolution_backward(go_img, as_rows(c, s, rc), w_rows, c10::nullopt,
                                                             {1, s.k}, {0, 0}, {1, 1}, false, {0, 0}, s.g,
                                                             {false, true, false}));
            r0 > 0 ? gw.add_(part) : gw.copy_(part);
          }
        }
        if (need_cols_grad) {
          auto grad_img = std::get<0>(at::convolution_backward(go_img, as_rows(cols.narrow(0, 0, pc), s, rc),
                                                               w_rows, c10::nullopt, {1, s.k}, {0, 0}, {1, 1}, false,
                                                               {0, 0}, s.g, {true, false, false}));
          auto gc = grad_img.permute({0, 2, 3, 1}).contiguous();  // back to (Pc, K, C)
          col2im<scalar_t>(xp, op, mp, zero.data_ptr<scalar_t>(), s, r0 * s.wo, pc, gc.data_ptr<scalar_t>(),
                           gx_ptrs, trash.data_ptr<scalar_t>(), need_offset ? goff.data_ptr<scalar_t>() : nullptr,
                           need_mask ? gmask.data_ptr<scalar_t>() : nullptr);
        }
      }
      for (auto& e : extra) gx_sink.add_(e);
    });
  }
  if (need_weight && rows == 0) gw.zero_();  // an empty batch: no chunk wrote it
  if (need_input) grad_input = gx.permute({0, 3, 1, 2});
  if (need_offset) grad_offset = goff.permute({0, 3, 1, 2});
  if (need_mask) grad_mask = gmask.permute({0, 3, 1, 2});
  if (need_weight) {
    grad_weight = s.g == 1 ? swap_last2(gw).view({s.c_out, s.c, s.kh, s.kw}) : gw.view({s.c_out, s.c / s.g, s.kh, s.kw});
  }
  return {grad_input, grad_offset, grad_mask, grad_weight, grad_bias};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dcn_det's deformable convolution CPU kernels";
  m.def("deform_conv2d_forward", &deform_conv2d_forward);
  m.def("deform_conv2d_backward", &deform_conv2d_backward);
}
