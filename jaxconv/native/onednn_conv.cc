// One-group convolutions on a CPU through oneDNN, as XLA FFI handlers (jaxconv/onednn.py builds and registers them).
//
// Layouts are jaxconv's: x [N, *spatial, C] (channels last), w [*kernel, C_in, C_out], y [N, *out, C_out]; 1 to 3
// spatial axes; float32 or bfloat16 (all three buffers of one dtype; oneDNN accumulates in float32). Attributes, one
// value per spatial axis: strides, dilations (1 = none), pads_lo, pads_hi (>= 0).
//
//   jaxconv_onednn_conv(x, w) -> y
//   jaxconv_onednn_input_grad(g, w) -> dx        (the shape of dx is the result's)
//   jaxconv_onednn_weight_grad(x, g) -> dw       (the shape of dw is the result's)
//
// JaxconvOnednnBuilds (a plain C function, called through ctypes before a conv is traced) says whether oneDNN can
// build all three primitives of one geometry on this CPU: bfloat16 needs AVX-512 (or AVX2-VNNI-2) in oneDNN 3.2, so on
// an AVX2-only CPU it cannot, and jaxconv lowers that conv to XLA's instead of failing at run time.
//
// Each primitive is built once per geometry and kept (oneDNN picks its kernels when it is built); the weights are
// reordered into the layout the primitive prefers on each call (they are small beside the activations), and each
// call has its own scratchpad, since XLA may run independent custom calls on several threads at once.
#include <cstdint>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;

namespace {

enum class Kind { kForward, kInputGrad, kWeightGrad };

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

struct Geometry {
  memory::data_type dtype;
  memory::dims src, weights, dst, strides, dilations, pads_lo, pads_hi;
  tag act, plain_weights;
};

struct Built {
  dnnl::primitive primitive;
  memory::desc a, b, out;  // the primitive's own descriptors for its two inputs and its output
  memory::desc scratchpad;  // allocated per call: XLA may run one primitive on several threads at once
};

dnnl::primitive_attr Attributes() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

std::string KeyOf(Kind kind, const Geometry& g) {
  std::ostringstream key;
  key << static_cast<int>(kind) << ':' << static_cast<int>(g.dtype);
  for (const auto* v : {&g.src, &g.weights, &g.dst, &g.strides, &g.dilations, &g.pads_lo, &g.pads_hi}) {
    key << '|';
    for (auto d : *v) key << d << ',';
  }
  return key.str();
}

dnnl::convolution_forward::primitive_desc ForwardDesc(const Geometry& g) {
  memory::desc src(g.src, g.dtype, g.act), weights(g.weights, g.dtype, tag::any), dst(g.dst, g.dtype, g.act);
  return dnnl::convolution_forward::primitive_desc(Engine(), dnnl::prop_kind::forward_training,
                                                   dnnl::algorithm::convolution_direct, src, weights, dst,
                                                   g.strides, g.dilations, g.pads_lo, g.pads_hi, Attributes());
}

Built Build(Kind kind, const Geometry& g) {
  auto forward = ForwardDesc(g);
  if (kind == Kind::kForward) {
    return {dnnl::convolution_forward(forward), forward.src_desc(), forward.weights_desc(), forward.dst_desc(),
            forward.scratchpad_desc()};
  }
  memory::desc src(g.src, g.dtype, g.act), weights(g.weights, g.dtype, tag::any), dst(g.dst, g.dtype, g.act);
  if (kind == Kind::kInputGrad) {
    dnnl::convolution_backward_data::primitive_desc pd(Engine(), dnnl::algorithm::convolution_direct, src, weights,
                                                       dst, g.strides, g.dilations, g.pads_lo, g.pads_hi, forward,
                                                       Attributes());
    return {dnnl::convolution_backward_data(pd), pd.diff_dst_desc(), pd.weights_desc(), pd.diff_src_desc(),
            pd.scratchpad_desc()};
  }
  dnnl::convolution_backward_weights::primitive_desc pd(Engine(), dnnl::algorithm::convolution_direct, src, weights,
                                                        dst, g.strides, g.dilations, g.pads_lo, g.pads_hi, forward,
                                                        Attributes());
  return {dnnl::convolution_backward_weights(pd), pd.src_desc(), pd.diff_dst_desc(), pd.diff_weights_desc(),
          pd.scratchpad_desc()};
}

const Built& Cached(Kind kind, const Geometry& g) {
  static std::mutex mutex;
  static std::unordered_map<std::string, std::unique_ptr<Built>> cache;
  std::string key = KeyOf(kind, g);
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(key);
  if (it == cache.end()) it = cache.emplace(key, std::make_unique<Built>(Build(kind, g))).first;
  return *it->second;
}

// x-shaped [N, *spatial, C] -> oneDNN's logical {N, C, *spatial}; w-shaped [*kernel, I, O] -> {O, I, *kernel}
memory::dims Activation(ffi::Span<const int64_t> shape) {
  memory::dims d = {shape[0], shape[shape.size() - 1]};
  for (size_t i = 1; i + 1 < shape.size(); ++i) d.push_back(shape[i]);
  return d;
}

memory::dims Kernel(ffi::Span<const int64_t> shape) {
  size_t n = shape.size();
  memory::dims d = {shape[n - 1], shape[n - 2]};
  for (size_t i = 0; i + 2 < n; ++i) d.push_back(shape[i]);
  return d;
}

// Fills everything of g but its dtype: layouts, oneDNN's logical dims, options (oneDNN counts a dilation's gaps).
void Describe(size_t spatial, ffi::Span<const int64_t> x, ffi::Span<const int64_t> w, ffi::Span<const int64_t> y,
              ffi::Span<const int64_t> strides, ffi::Span<const int64_t> dilations, ffi::Span<const int64_t> pads_lo,
              ffi::Span<const int64_t> pads_hi, Geometry* g) {
  static const tag acts[] = {tag::nwc, tag::nhwc, tag::ndhwc};
  static const tag kernels[] = {tag::wio, tag::hwio, tag::dhwio};
  g->act = acts[spatial - 1];
  g->plain_weights = kernels[spatial - 1];
  g->src = Activation(x);
  g->weights = Kernel(w);
  g->dst = Activation(y);
  g->strides.assign(strides.begin(), strides.end());
  g->pads_lo.assign(pads_lo.begin(), pads_lo.end());
  g->pads_hi.assign(pads_hi.begin(), pads_hi.end());
  g->dilations.clear();
  for (auto d : dilations) g->dilations.push_back(d - 1);
}

ffi::Error MakeGeometry(const ffi::AnyBuffer& x, const ffi::AnyBuffer& w, const ffi::AnyBuffer& y,
                        ffi::Span<const int64_t> strides, ffi::Span<const int64_t> dilations,
                        ffi::Span<const int64_t> pads_lo, ffi::Span<const int64_t> pads_hi, Geometry* g) {
  size_t spatial = x.dimensions().size() - 2;
  if (spatial < 1 || spatial > 3 || w.dimensions().size() != spatial + 2 || y.dimensions().size() != spatial + 2 ||
      strides.size() != spatial || dilations.size() != spatial || pads_lo.size() != spatial ||
      pads_hi.size() != spatial) {
    return ffi::Error::InvalidArgument("jaxconv oneDNN conv: 1 to 3 spatial axes, every option one per axis");
  }
  if (x.element_type() != w.element_type() || x.element_type() != y.element_type()) {
    return ffi::Error::InvalidArgument("jaxconv oneDNN conv: all buffers must share one dtype");
  }
  switch (x.element_type()) {
    case ffi::DataType::F32: g->dtype = memory::data_type::f32; break;
    case ffi::DataType::BF16: g->dtype = memory::data_type::bf16; break;
    default: return ffi::Error::InvalidArgument("jaxconv oneDNN conv: float32 or bfloat16 only");
  }
  Describe(spatial, x.dimensions(), w.dimensions(), y.dimensions(), strides, dilations, pads_lo, pads_hi, g);
  return ffi::Error::Success();
}

// Runs the cached primitive of `kind` on a (first input), b (second input) and out; the plain weights are b, or out
// for the weight gradient.
ffi::Error Run(Kind kind, const Geometry& g, void* a, void* b, void* out) {
  try {
    const Built& built = Cached(kind, g);
    dnnl::stream stream(Engine());
    memory::desc plain(g.weights, g.dtype, g.plain_weights);
    bool weights_out = kind == Kind::kWeightGrad;
    const memory::desc& wanted = weights_out ? built.out : built.b;
    void* plain_ptr = weights_out ? out : b;
    memory plain_mem(plain, Engine(), plain_ptr);
    memory weights_mem = plain_mem;
    bool reorder = wanted != plain;
    if (reorder) weights_mem = memory(wanted, Engine());
    if (reorder && !weights_out) dnnl::reorder(plain_mem, weights_mem).execute(stream, plain_mem, weights_mem);
    memory a_mem(built.a, Engine(), a);
    memory scratchpad(built.scratchpad, Engine());
    if (kind == Kind::kForward) {
      memory out_mem(built.out, Engine(), out);
      built.primitive.execute(stream, {{DNNL_ARG_SRC, a_mem}, {DNNL_ARG_WEIGHTS, weights_mem}, {DNNL_ARG_DST, out_mem},
                                       {DNNL_ARG_SCRATCHPAD, scratchpad}});
    } else if (kind == Kind::kInputGrad) {
      memory out_mem(built.out, Engine(), out);
      built.primitive.execute(stream, {{DNNL_ARG_DIFF_DST, a_mem}, {DNNL_ARG_WEIGHTS, weights_mem},
                                       {DNNL_ARG_DIFF_SRC, out_mem}, {DNNL_ARG_SCRATCHPAD, scratchpad}});
    } else {
      memory b_mem(built.b, Engine(), b);
      built.primitive.execute(stream, {{DNNL_ARG_SRC, a_mem}, {DNNL_ARG_DIFF_DST, b_mem},
                                       {DNNL_ARG_DIFF_WEIGHTS, weights_mem}, {DNNL_ARG_SCRATCHPAD, scratchpad}});
      if (reorder) dnnl::reorder(weights_mem, plain_mem).execute(stream, weights_mem, plain_mem);
    }
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("jaxconv oneDNN conv: ") + e.what());
  }
  return ffi::Error::Success();
}

#define JAXCONV_OPTIONS ffi::Span<const int64_t> strides, ffi::Span<const int64_t> dilations, \
                        ffi::Span<const int64_t> pads_lo, ffi::Span<const int64_t> pads_hi
#define JAXCONV_PASS strides, dilations, pads_lo, pads_hi

ffi::Error Conv(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> y, JAXCONV_OPTIONS) {
  Geometry g;
  if (auto e = MakeGeometry(x, w, *y, JAXCONV_PASS, &g); e.failure()) return e;
  return Run(Kind::kForward, g, x.untyped_data(), w.untyped_data(), y->untyped_data());
}

ffi::Error InputGrad(ffi::AnyBuffer dy, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> dx, JAXCONV_OPTIONS) {
  Geometry g;
  if (auto e = MakeGeometry(*dx, w, dy, JAXCONV_PASS, &g); e.failure()) return e;
  return Run(Kind::kInputGrad, g, dy.untyped_data(), w.untyped_data(), dx->untyped_data());
}

ffi::Error WeightGrad(ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::Result<ffi::AnyBuffer> dw, JAXCONV_OPTIONS) {
  Geometry g;
  if (auto e = MakeGeometry(x, *dw, dy, JAXCONV_PASS, &g); e.failure()) return e;
  return Run(Kind::kWeightGrad, g, x.untyped_data(), dy.untyped_data(), dw->untyped_data());
}

#define JAXCONV_BINDING                                                                         \
  ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>()            \
      .Attr<ffi::Span<const int64_t>>("strides").Attr<ffi::Span<const int64_t>>("dilations")   \
      .Attr<ffi::Span<const int64_t>>("pads_lo").Attr<ffi::Span<const int64_t>>("pads_hi")

}  // namespace

// 1 when oneDNN builds the forward, input-gradient and weight-gradient primitives of this geometry (they are then
// cached for the calls), 0 when it cannot. dtype: 0 float32, 1 bfloat16. Shapes in jaxconv's layouts, rank
// spatial + 2; strides, dilations (1 = none) and pads one per spatial axis.
extern "C" int JaxconvOnednnBuilds(int dtype, int spatial, const int64_t* x, const int64_t* w, const int64_t* y,
                                   const int64_t* strides, const int64_t* dilations, const int64_t* pads_lo,
                                   const int64_t* pads_hi) {
  if (spatial < 1 || spatial > 3 || dtype < 0 || dtype > 1) return 0;
  size_t n = static_cast<size_t>(spatial), rank = n + 2;
  using S = ffi::Span<const int64_t>;
  Geometry g;
  g.dtype = dtype == 0 ? memory::data_type::f32 : memory::data_type::bf16;
  Describe(n, S(x, rank), S(w, rank), S(y, rank), S(strides, n), S(dilations, n), S(pads_lo, n), S(pads_hi, n), &g);
  try {
    for (Kind kind : {Kind::kForward, Kind::kInputGrad, Kind::kWeightGrad}) Cached(kind, g);
  } catch (const dnnl::error&) {
    return 0;
  }
  return 1;
}

#ifndef JAXCONV_JAXLIB
#define JAXCONV_JAXLIB "unknown"
#endif

// The jaxlib whose FFI headers this library was compiled against (set by the package build).
extern "C" const char* JaxconvBuiltWith() { return JAXCONV_JAXLIB; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxconvOnednnConv, Conv, JAXCONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxconvOnednnInputGrad, InputGrad, JAXCONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxconvOnednnWeightGrad, WeightGrad, JAXCONV_BINDING);
