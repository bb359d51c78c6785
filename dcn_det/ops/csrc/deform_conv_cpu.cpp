// Deformable convolution (DCNv1 / DCNv2) on the CPU: bilinear im2col, the GEMMs through ATen's matmul and
// convolution (oneDNN), and a fused col2im that also produces the offset and mask gradients. Public ATen API
// only. (A convolution is a GEMM when the columns are seen as rows of an image convolved by a 1xK kernel with
// stride K; which GEMM takes which form is in matmul_forward / matmul_column_grad.)
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
//
// Dtypes: float32 and float64 throughout; bfloat16 (storage type S = bf16 bits) keeps x, the columns and the
// column gradient in bfloat16, so that the GEMMs run in bfloat16 with float32 accumulation (oneDNN), and
// computes every sample position, bilinear weight and sum in float32 (the accumulation type A): the input,
// offset, mask and weight gradients are accumulated in float32 and returned so (the weight gradient of a
// single chunk: in bfloat16, see deform_conv2d_backward).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

namespace {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(DCN_NO_CLONES)
#define DCN_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DCN_CLONES
#endif

// bfloat16 as its 16 bits (the upper half of a float32); conversions written so that the loops vectorise
using bf16 = uint16_t;
inline float to_float(bf16 v) {
  const uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
// round to nearest even, as torch rounds; a NaN stays a (quiet) NaN
inline bf16 to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return static_cast<bf16>((u & 0x7fffffffu) > 0x7f800000u ? (u >> 16) | 0x40u : rounded);
}

// The accumulation type of a storage type, and conversions between the two
template <typename S>
using acc_t = std::conditional_t<std::is_same_v<S, bf16>, float, S>;
inline float to_acc(float v) { return v; }
inline double to_acc(double v) { return v; }
inline float to_acc(bf16 v) { return to_float(v); }
template <typename S>
inline S to_storage(acc_t<S> v) {
  if constexpr (std::is_same_v<S, bf16>) {
    return to_bf16(v);
  } else {
    return v;
  }
}

// dst[i] = wa a[i] + wb b[i] + wc c[i] + wd d[i]
template <typename S, typename T = acc_t<S>>
inline void bilinear4_impl(S* __restrict dst, const S* a, const S* b, const S* c, const S* d, T wa, T wb, T wc,
                           T wd, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    dst[i] = to_storage<S>(wa * to_acc(a[i]) + wb * to_acc(b[i]) + wc * to_acc(c[i]) + wd * to_acc(d[i]));
}
#define DCN_BILINEAR4(S, T)                                                                                  \
  DCN_CLONES void bilinear4(S* __restrict dst, const S* a, const S* b, const S* c, const S* d, T wa, T wb,   \
                            T wc, T wd, int64_t n) {                                                         \
    bilinear4_impl(dst, a, b, c, d, wa, wb, wc, wd, n);                                                      \
  }
DCN_BILINEAR4(float, float)
DCN_BILINEAR4(double, double)
DCN_BILINEAR4(bf16, float)
#undef DCN_BILINEAR4

// ga[i] += wa g[i] (likewise b, c, d) and s = (<g, a>, <g, b>, <g, c>, <g, d>); with kCol also
// col[i] = wa a[i] + wb b[i] + wc c[i] + wd d[i] (the column of the weight gradient, from the same reads)
template <bool kCol, typename S, typename T = acc_t<S>>
inline void scatter4_dot4_impl(const S* __restrict g, T* __restrict ga, T* __restrict gb, T* __restrict gc,
                               T* __restrict gd, const S* a, const S* b, const S* c, const S* d, T wa, T wb,
                               T wc, T wd, int64_t n, T* s, S* __restrict col) {
  T sa = 0, sb = 0, sc = 0, sd = 0;
#pragma omp simd reduction(+ : sa, sb, sc, sd)
  for (int64_t i = 0; i < n; ++i) {
    const T gi = to_acc(g[i]), ai = to_acc(a[i]), bi = to_acc(b[i]), ci = to_acc(c[i]), di = to_acc(d[i]);
    if constexpr (kCol) col[i] = to_storage<S>(wa * ai + wb * bi + wc * ci + wd * di);
    ga[i] += wa * gi;
    gb[i] += wb * gi;
    gc[i] += wc * gi;
    gd[i] += wd * gi;
    sa += gi * ai;
    sb += gi * bi;
    sc += gi * ci;
    sd += gi * di;
  }
  s[0] += sa;
  s[1] += sb;
  s[2] += sc;
  s[3] += sd;
}
#define DCN_SCATTER4_DOT4(S, T)                                                                                  \
  DCN_CLONES void scatter4_dot4(const S* __restrict g, T* __restrict ga, T* __restrict gb, T* __restrict gc,     \
                                T* __restrict gd, const S* a, const S* b, const S* c, const S* d, T wa, T wb,     \
                                T wc, T wd, int64_t n, T* s, S* __restrict col) {                                \
    if (col)                                                                                                     \
      scatter4_dot4_impl<true>(g, ga, gb, gc, gd, a, b, c, d, wa, wb, wc, wd, n, s, col);                        \
    else                                                                                                         \
      scatter4_dot4_impl<false>(g, ga, gb, gc, gd, a, b, c, d, wa, wb, wc, wd, n, s, col);                       \
  }
DCN_SCATTER4_DOT4(float, float)
DCN_SCATTER4_DOT4(double, double)
DCN_SCATTER4_DOT4(bf16, float)
#undef DCN_SCATTER4_DOT4

// The tensors' data as their storage type
template <typename S>
S* ptr(const at::Tensor& t) {
  if constexpr (std::is_same_v<S, bf16>) {
    return reinterpret_cast<bf16*>(t.data_ptr<at::BFloat16>());
  } else {
    return t.data_ptr<S>();
  }
}

at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kBFloat16 ? at::kFloat : t; }

// Calls f(S{}) with S the storage type of dtype
template <typename F>
void dispatch(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: f(float{}); break;
    case at::kDouble: f(double{}); break;
    case at::kBFloat16: f(bf16{}); break;
    default: TORCH_CHECK(false, "dcn_det CPU kernel: float32, float64 or bfloat16 only");
  }
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
template <typename S, typename T = acc_t<S>>
struct Sample {
  const S* row[4];
  int64_t index[4];  // pixel index n*H*W + y*W + x of each corner, -1 outside
  T weight[4];       // bilinear weights (without the mask)
  T lh, lw;          // fractional position
  bool inside;
};

template <typename S, typename T = acc_t<S>>
inline Sample<S> sample(const S* x, const S* zero, const Geometry& s, int64_t n, int64_t y, int64_t xo, int64_t ki,
                        int64_t dg_i, T off_h, T off_w) {
  Sample<S> out;
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
template <typename S, typename T, typename F>
inline void for_each_sample(const S* x, const T* offset, const T* mask, const S* zero, const Geometry& s, int64_t gp,
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
template <typename S, typename T = acc_t<S>>
void im2col(const S* x, const T* offset, const T* mask, const S* zero, const Geometry& s, int64_t p0, int64_t pc,
            S* cols) {
  at::parallel_for(0, pc, 16, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      for_each_sample(x, offset, mask, zero, s, p0 + p,
                      [&](int64_t dg_i, int64_t ki, int64_t, const Sample<S>& smp, T scale) {
                        bilinear4(cols + (p * s.k + ki) * s.c + dg_i * s.cd, smp.row[0], smp.row[1], smp.row[2],
                                  smp.row[3], smp.weight[0] * scale, smp.weight[1] * scale, smp.weight[2] * scale,
                                  smp.weight[3] * scale, s.cd);
                      });
    }
  });
}

// Transposes im2col for the pixels [p0, p0 + pc): scatters grad_cols (Pc, K, C) into the blocks' private
// input-gradient buffers (no two threads write one buffer) and writes the offset and mask gradients; with
// cols, also writes the columns (as im2col), from the same reads of the input.
template <typename S, typename T = acc_t<S>>
void col2im(const S* x, const T* offset, const T* mask, const S* zero, const Geometry& s, int64_t p0, int64_t pc,
            const S* grad_cols, const std::vector<T*>& grad_x, T* trash, T* grad_offset, T* grad_mask, S* cols) {
  const int64_t blocks = static_cast<int64_t>(grad_x.size());
  const int64_t step = (pc + blocks - 1) / blocks;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      T* gx = grad_x[b];
      T* bin = trash + b * 4 * s.cd;  // where the corners outside the image write
      for (int64_t p = b * step; p < std::min(pc, (b + 1) * step); ++p) {
        const int64_t gp = p0 + p;
        for_each_sample(x, offset, mask, zero, s, gp, [&](int64_t dg_i, int64_t ki, int64_t si,
                                                          const Sample<S>& smp, T scale) {
          T dots[4] = {0, 0, 0, 0};
          const int64_t at = (p * s.k + ki) * s.c + dg_i * s.cd;
          if (smp.inside) {
            T* dst[4];
            for (int q = 0; q < 4; ++q)
              dst[q] = smp.index[q] >= 0 ? gx + smp.index[q] * s.c + dg_i * s.cd : bin + q * s.cd;
            scatter4_dot4(grad_cols + at, dst[0], dst[1], dst[2], dst[3], smp.row[0], smp.row[1], smp.row[2],
                          smp.row[3], smp.weight[0] * scale, smp.weight[1] * scale, smp.weight[2] * scale,
                          smp.weight[3] * scale, s.cd, dots, cols ? cols + at : nullptr);
          } else if (cols) {
            std::fill_n(cols + at, s.cd, S(0));
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

// dst (A, C, B) = src (A, B, C) transposed, both contiguous, in 16 x 16 tiles (a strided copy of a large
// matrix misses the cache on every write); E is an unsigned integer of the element's size. Measured at the
// weight and image shapes of ResNet's c3-c5, as fast as ATen's copy of a transposed view or faster (up to 4x
// for an image); 2x the speed of 32 x 32 tiles with their bounds inside the loops.
template <typename E>
void transpose_tiles(const E* __restrict src, E* __restrict dst, int64_t a, int64_t b, int64_t c) {
  constexpr int64_t tile = 16;
  const int64_t tb = (b + tile - 1) / tile;
  at::parallel_for(0, a * tb, 1, [=](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t i = t / tb, j0 = t % tb * tile, j1 = std::min(b, j0 + tile);
      const E* __restrict sp = src + i * b * c;
      E* __restrict dp = dst + i * b * c;
      for (int64_t l0 = 0; l0 < c; l0 += tile) {
        const int64_t l1 = std::min(c, l0 + tile);
        if (j1 - j0 == tile && l1 - l0 == tile) {  // a full tile: constant trip counts, unrolled
          for (int64_t l = 0; l < tile; ++l)
            for (int64_t j = 0; j < tile; ++j) dp[(l0 + l) * b + j0 + j] = sp[(j0 + j) * c + l0 + l];
        } else {
          for (int64_t l = l0; l < l1; ++l)
            for (int64_t j = j0; j < j1; ++j) dp[l * b + j] = sp[j * c + l];
        }
      }
    }
  });
}

// dst = src (A, B, C) transposed to (A, C, B); both contiguous, with A * B * C elements of one size
void transpose_into(const at::Tensor& src, at::Tensor& dst, int64_t a, int64_t b, int64_t c) {
  switch (src.element_size()) {
    case 2: transpose_tiles(static_cast<const uint16_t*>(src.const_data_ptr()), static_cast<uint16_t*>(dst.data_ptr()), a, b, c); break;
    case 4: transpose_tiles(static_cast<const uint32_t*>(src.const_data_ptr()), static_cast<uint32_t*>(dst.data_ptr()), a, b, c); break;
    case 8: transpose_tiles(static_cast<const uint64_t*>(src.const_data_ptr()), static_cast<uint64_t*>(dst.data_ptr()), a, b, c); break;
    default: TORCH_CHECK(false, "dcn_det CPU kernel: unexpected element size");
  }
}

// (A, B, C) -> (A, C, B) contiguous
at::Tensor swap_last2(const at::Tensor& t) {
  auto src = t.contiguous();
  const int64_t a = src.size(0), b = src.size(1), c = src.size(2);
  auto dst = at::empty({a, c, b}, src.options());
  transpose_into(src, dst, a, b, c);
  return dst;
}

// Whether an (N, C, H, W) tensor is channels-last (and not also NCHW): outputs and gradients follow it, as
// F.conv2d's do
bool channels_last(const at::Tensor& t) {
  return t.is_contiguous(at::MemoryFormat::ChannelsLast) && !t.is_contiguous();
}

// (N, C, H, W) -> (N, H, W, C) contiguous: a view of a channels-last tensor, else a tiled transpose
at::Tensor to_rows(const at::Tensor& t) {
  if (t.is_contiguous(at::MemoryFormat::ChannelsLast)) return t.permute({0, 2, 3, 1});
  const int64_t n = t.size(0), c = t.size(1), h = t.size(2), w = t.size(3);
  return swap_last2(t.reshape({n, c, h * w})).view({n, h, w, c});
}

// A result (N, C, H, W) in a given memory format, and the (N, H, W, C) contiguous rows the kernels write: the
// result's own memory when it is channels-last, else a buffer that finish() transposes into a new tensor.
// The result is never a view (an op's output may be modified in place).
struct Rows {
  at::Tensor result, rows;

  Rows(int64_t n, int64_t c, int64_t h, int64_t w, const at::TensorOptions& options, bool to_channels_last,
       bool zeroed) {
    if (to_channels_last) {
      result = at::empty({n, c, h, w}, options.memory_format(at::MemoryFormat::ChannelsLast));
      rows = result.permute({0, 2, 3, 1});
    } else {
      rows = at::empty({n, h, w, c}, options);
    }
    if (zeroed) rows.zero_();
  }

  at::Tensor finish() const {
    if (result.defined()) return result;
    const int64_t n = rows.size(0), h = rows.size(1), w = rows.size(2), c = rows.size(3);
    auto out = at::empty({n, c, h, w}, rows.options());
    transpose_into(rows, out, n, h * w, c);
    return out;
  }
};

// Scratch buffers kept between calls (per calling thread, by use), for the columns, their gradient and the
// weight rows: buffers of these sizes come from fresh mmap'd pages on every allocation, and faulting them in
// cost as much as filling them. Never returned to the caller.
enum Scratch { kColumns, kColumnGrad, kWeightRows, kScratchKinds };

at::Tensor scratch(Scratch use, at::IntArrayRef sizes, const at::TensorOptions& options) {
  static thread_local at::Tensor cache[kScratchKinds];
  at::Tensor& buffer = cache[use];
  const int64_t numel = c10::multiply_integers(sizes);
  if (!buffer.defined() || buffer.numel() < numel || buffer.scalar_type() != options.dtype().toScalarType())
    buffer = at::empty({numel}, options);
  return buffer.narrow(0, 0, numel).view(sizes);
}

// weight (C_out, C/G, kh, kw) in the column layout: (C_out, K, C/G) contiguous, in a scratch buffer
at::Tensor weight_rows(const at::Tensor& weight, const Geometry& s) {
  auto src = weight.contiguous();
  auto dst = scratch(kWeightRows, {s.c_out, s.k, s.c / s.g}, weight.options());
  transpose_into(src, dst, s.c_out, s.c / s.g, s.k);
  return dst;
}

// weight rows (C_out, K, C/G) as the conv weight (C_out, C/G, 1, K) in channels-last memory, the form oneDNN
// takes without a copy
at::Tensor as_conv_weight(const at::Tensor& w_rows, const Geometry& s) {
  return w_rows.view({s.c_out, 1, s.k, s.c / s.g}).permute({0, 3, 1, 2});
}

// Which GEMMs are matmuls ((Pc, K*C) columns times (K*C, C_out) weights) rather than convolutions over the
// columns: measured on oneDNN/MKL (torch 2.14, AVX-512), the matmul is as fast or faster for the column
// gradient in every dtype, and for the bfloat16 forward; the float32 forward is faster as a convolution at
// 128-256 channels (MKL's sgemm). Grouped convolutions always run as convolutions.
bool matmul_forward(const Geometry& s, at::ScalarType dtype) { return s.g == 1 && dtype == at::kBFloat16; }
bool matmul_column_grad(const Geometry& s) { return s.g == 1; }

// (rows, K, C) columns of rows output pixels
at::Tensor column_buffer(Scratch use, int64_t rows, const Geometry& s, const at::TensorOptions& options) {
  return scratch(use, {rows, s.k, s.c}, options);
}

// cols (Pc, K, C) of rc output rows as the channels-last image batch (rc, C, 1, Wo*K)
at::Tensor as_rows(const at::Tensor& cols, const Geometry& s, int64_t rc) {
  return cols.view({rc, 1, s.wo * s.k, s.c}).permute({0, 3, 1, 2});
}

void check_inputs(const at::Tensor& input, const at::Tensor& offset, const c10::optional<at::Tensor>& mask,
                  const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  const auto dtype = input.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16,
              "dcn_det CPU kernel: float32, float64 or bfloat16 only");
  TORCH_CHECK(input.device().is_cpu(), "dcn_det CPU kernel: CPU tensors only");
  TORCH_CHECK(offset.scalar_type() == dtype && weight.scalar_type() == dtype, "dcn_det CPU kernel: one dtype");
  TORCH_CHECK(!mask || mask->scalar_type() == dtype, "dcn_det CPU kernel: one dtype");
  TORCH_CHECK(!bias || bias->scalar_type() == dtype, "dcn_det CPU kernel: one dtype");
}

}  // namespace

// Returns the output (N, C_out, Ho, Wo) in the input's dtype and memory format.
at::Tensor deform_conv2d_forward(const at::Tensor& input, const at::Tensor& offset,
                                 const c10::optional<at::Tensor>& mask, const at::Tensor& weight,
                                 const c10::optional<at::Tensor>& bias, int64_t sh, int64_t sw, int64_t ph,
                                 int64_t pw, int64_t dh, int64_t dw, int64_t groups, int64_t offset_groups,
                                 int64_t chunk_bytes) {
  check_inputs(input, offset, mask, weight, bias);
  const Geometry s = geometry(input, weight, sh, sw, ph, pw, dh, dw, groups, offset_groups);
  const Rows result(s.n, s.c_out, s.ho, s.wo, input.options(), channels_last(input), false);
  const auto& out = result.rows;
  const int64_t rows = s.n * s.ho;
  if (rows == 0) return result.finish();
  const auto acc = acc_dtype(input.scalar_type());
  auto x = to_rows(input);
  auto off = to_rows(offset.to(acc));
  at::Tensor msk = mask ? to_rows(mask->to(acc)) : at::Tensor();
  auto w_rows = weight_rows(weight, s);
  auto out_rows = out.view({rows, s.wo, s.c_out});
  const int64_t step = std::min(rows, rows_per_chunk(s, chunk_bytes, input.element_size()));
  dispatch(input.scalar_type(), [&](auto tag) {
    using S = decltype(tag);
    using T = acc_t<S>;
    auto zero = at::zeros({s.cd}, input.options());
    auto cols = column_buffer(kColumns, step * s.wo, s, input.options());
    for (int64_t r0 = 0; r0 < rows; r0 += step) {
      const int64_t rc = std::min(step, rows - r0);
      auto c = cols.narrow(0, 0, rc * s.wo);
      im2col<S>(ptr<S>(x), ptr<T>(off), msk.defined() ? ptr<T>(msk) : nullptr, ptr<S>(zero), s, r0 * s.wo,
                rc * s.wo, ptr<S>(c));
      auto o_rows = out_rows.narrow(0, r0, rc);
      if (matmul_forward(s, input.scalar_type())) {
        auto o2d = o_rows.view({rc * s.wo, s.c_out});
        auto w2d = w_rows.view({s.c_out, s.k * s.c}).t();
        bias ? at::addmm_out(o2d, *bias, c.view({rc * s.wo, s.k * s.c}), w2d)
             : at::mm_out(o2d, c.view({rc * s.wo, s.k * s.c}), w2d);
      } else {
        // (rc, C_out, 1, Wo) in channels-last memory: the chunk's rows of output pixels
        const std::vector<int64_t> stride{1, s.k}, pad{0, 0}, dil{1, 1};
        auto o = at::conv2d(as_rows(c, s, rc), as_conv_weight(w_rows, s), bias, at::IntArrayRef(stride),
                            at::IntArrayRef(pad), at::IntArrayRef(dil), s.g);
        o_rows.copy_(o.permute({0, 2, 3, 1}).view({rc, s.wo, s.c_out}));
      }
    }
  });
  return result.finish();
}

// Gradients of input, offset, mask, weight, bias; an undefined tensor where not asked for. They are in the
// accumulation dtype (the input's, float32 for bfloat16) and each in its tensor's memory format, except a
// bfloat16 weight gradient computed in one chunk: one GEMM with float32 accumulation, returned in bfloat16
// as the GEMM writes it (the weight's dtype: a float32 copy would be rounded back).
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
  const auto acc = acc_dtype(input.scalar_type());
  const auto acc_options = input.options().dtype(acc);
  // channels-last rows of the output gradient: (N*Ho, Wo, C_out)
  auto go = to_rows(grad_out.to(input.scalar_type())).reshape({rows, s.wo, s.c_out});
  at::Tensor grad_input, grad_offset, grad_mask, grad_weight, grad_bias;
  if (need_bias) grad_bias = go.sum(at::IntArrayRef{0, 1}, false, acc);
  auto x = to_rows(input);
  auto off = to_rows(offset.to(acc));
  at::Tensor msk = mask ? to_rows(mask->to(acc)) : at::Tensor();
  auto w_rows = weight_rows(weight, s);
  // weight gradient as (C_out, K, C) (the column layout), for one GEMM per chunk when groups == 1
  // (the first chunk writes it, the others add)
  at::Tensor gw = need_weight ? at::empty(s.g == 1 ? at::IntArrayRef{s.c_out, s.k, s.c}
                                                   : at::IntArrayRef{s.c_out, s.c / s.g, 1, s.k},
                                          acc_options)
                              : at::Tensor();
  // channels-last accumulators, returned in their tensors' memory formats
  std::optional<Rows> gx_rows, goff_rows, gmask_rows;
  if (need_input) gx_rows.emplace(s.n, s.c, s.h, s.w, acc_options, channels_last(input), true);
  if (need_offset) goff_rows.emplace(s.n, s.dg * s.k * 2, s.ho, s.wo, acc_options, channels_last(offset), true);
  if (need_mask) gmask_rows.emplace(s.n, s.dg * s.k, s.ho, s.wo, acc_options, channels_last(*mask), true);
  at::Tensor gx = need_input ? gx_rows->rows : at::Tensor();
  at::Tensor goff = need_offset ? goff_rows->rows : at::Tensor();
  at::Tensor gmask = need_mask ? gmask_rows->rows : at::Tensor();
  const bool need_cols_grad = need_input || need_offset || need_mask;
  if (rows > 0 && (need_weight || need_cols_grad)) {
    const int64_t step = std::min(rows, rows_per_chunk(s, chunk_bytes, input.element_size()));
    // one input-gradient buffer per block of pixels: blocks run in parallel and never share a buffer. The
    // extra buffers (block 0 writes gx itself) are capped at 256 MiB in all.
    const int64_t image_bytes = s.n * s.h * s.w * s.c * c10::elementSize(acc);
    int64_t blocks = need_cols_grad ? at::get_num_threads() : 1;
    blocks = std::max<int64_t>(1, std::min<int64_t>(blocks, 1 + (int64_t(256) << 20) / std::max<int64_t>(1, image_bytes)));
    dispatch(input.scalar_type(), [&](auto tag) {
      using S = decltype(tag);
      using T = acc_t<S>;
      auto zero = at::zeros({s.cd}, input.options());
      auto trash = at::empty({blocks * 4 * s.cd}, acc_options);
      std::vector<at::Tensor> extra;
      std::vector<T*> gx_ptrs;
      at::Tensor gx_sink = gx.defined() ? gx : at::zeros({s.n, s.h, s.w, s.c}, acc_options);
      if (need_cols_grad) {
        gx_ptrs.push_back(ptr<T>(gx_sink));
        for (int64_t b = 1; b < blocks; ++b) {
          extra.push_back(at::zeros_like(gx_sink));
          gx_ptrs.push_back(ptr<T>(extra.back()));
        }
      }
      auto cols = column_buffer(kColumns, step * s.wo, s, input.options());
      const S* xp = ptr<S>(x);
      const T* op = ptr<T>(off);
      const T* mp = msk.defined() ? ptr<T>(msk) : nullptr;
      for (int64_t r0 = 0; r0 < rows; r0 += step) {
        const int64_t rc = std::min(step, rows - r0), pc = rc * s.wo;
        auto go_c = go.narrow(0, r0, rc);  // (rc, Wo, C_out)
        auto go_img = go_c.permute({0, 2, 1}).unsqueeze(2);  // (rc, C_out, 1, Wo), channels-last
        // the columns are recomputed rather than kept from the forward, as mmcv does: by im2col, or, when the
        // column gradient is needed too, by col2im from the same reads of the input
        auto c = cols.narrow(0, 0, pc);
        if (need_cols_grad) {
          at::Tensor gc;  // (Pc, K, C)
          if (matmul_column_grad(s)) {
            gc = column_buffer(kColumnGrad, pc, s, input.options());
            auto gc2d = gc.view({pc, s.k * s.c});
            at::mm_out(gc2d, go_c.reshape({pc, s.c_out}), w_rows.view({s.c_out, s.k * s.c}));
          } else {
            auto grad_img = std::get<0>(at::convolution_backward(go_img, as_rows(c, s, rc), as_conv_weight(w_rows, s),
                                                                 c10::nullopt, {1, s.k}, {0, 0}, {1, 1}, false, {0, 0},
                                                                 s.g, {true, false, false}));
            gc = grad_img.permute({0, 2, 3, 1}).contiguous();
          }
          col2im<S>(xp, op, mp, ptr<S>(zero), s, r0 * s.wo, pc, ptr<S>(gc), gx_ptrs, ptr<T>(trash),
                    need_offset ? ptr<T>(goff) : nullptr, need_mask ? ptr<T>(gmask) : nullptr,
                    need_weight ? ptr<S>(c) : nullptr);
        } else if (need_weight) {
          im2col<S>(xp, op, mp, ptr<S>(zero), s, r0 * s.wo, pc, ptr<S>(c));
        }
        if (need_weight) {
          at::Tensor part;
          if (s.g == 1) {
            auto gw2d = gw.view({s.c_out, s.k * s.c});
            auto go2d = go_c.reshape({pc, s.c_out}).t();
            if (std::is_same_v<S, T>) {  // the first chunk writes (beta = 0 would still scale gw), the others add
              r0 > 0 ? gw2d.addmm_(go2d, c.view({pc, s.k * s.c})) : at::mm_out(gw2d, go2d, c.view({pc, s.k * s.c}));
            } else if (pc == rows * s.wo) {  // one chunk: the bfloat16 GEMM's own result, no float32 copy
              gw = at::mm(go2d, c.view({pc, s.k * s.c})).view({s.c_out, s.k, s.c});
            } else {  // a bfloat16 GEMM per chunk, summed in float32
              part = at::mm(go2d, c.view({pc, s.k * s.c}));
              r0 > 0 ? gw2d.add_(part) : gw2d.copy_(part);
            }
          } else {
            part = std::get<1>(at::convolution_backward(go_img, as_rows(c, s, rc), as_conv_weight(w_rows, s),
                                                        c10::nullopt, {1, s.k}, {0, 0}, {1, 1}, false, {0, 0}, s.g,
                                                        {false, true, false}));
            r0 > 0 ? gw.add_(part) : gw.copy_(part);
          }
        }
      }
      for (auto& e : extra) gx_sink.add_(e);
    });
  }
  if (need_weight && rows == 0) gw.zero_();  // an empty batch: no chunk wrote it
  if (need_input) grad_input = gx_rows->finish();
  if (need_offset) grad_offset = goff_rows->finish();
  if (need_mask) grad_mask = gmask_rows->finish();
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
