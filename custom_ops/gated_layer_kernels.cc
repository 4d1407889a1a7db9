// The OpKernel of LrcGatedLayer (registered in gated_layer_ops.cc): it validates its inputs with an error that names them and their sizes, allocates the
// outputs and hands everything to the device's functor (gated_layer.h is the contract).
#define EIGEN_USE_THREADS
#include <cmath>
#include <string>

#include "gated_layer.h"
#include "input_shapes.h"
#include "tensorflow/core/framework/op_kernel.h"

namespace lrc {
namespace {

using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;

template <typename Device>
class GatedLayerOpKernel : public OpKernel {
 public:
  explicit GatedLayerOpKernel(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("rank", &rank_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("sample_rows", &sample_rows_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("layer", &layer_));
  }

  void Compute(OpKernelContext* ctx) override {
    GatedLayerArgs args;
    OP_REQUIRES_OK(ctx, Prepare(ctx, &args));
    Tensor* y = nullptr;
    Tensor* skipped = nullptr;
    Tensor* gate_counts = nullptr;
    Tensor* active_fraction = nullptr;
    Tensor projected;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({args.batch, args.units}), &y));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({args.sample_rows, args.units}), &skipped));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, TensorShape({4}), &gate_counts));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(3, TensorShape({}), &active_fraction));
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DT_FLOAT, TensorShape({args.batch, args.rank}),
                                           &projected));
    args.projected = projected.flat<float>().data();
    args.y = y->flat<float>().data();
    args.skipped = skipped->flat<float>().data();
    args.gate_counts = gate_counts->flat<float>().data();
    args.active_fraction = active_fraction->flat<float>().data();
    GatedLayerFunctor<Device>()(ctx, args);
  }

 private:
  absl::Status Prepare(OpKernelContext* ctx, GatedLayerArgs* args) const {
    const auto names = {"x", "factors", "kernel", "bias", "margin", "z", "rank_now"};
    const Tensor& x = ctx->input(0);
    const Tensor& factors = ctx->input(1);
    const Tensor& kernel = ctx->input(2);
    const Tensor& bias = ctx->input(3);
    const Tensor& margin = ctx->input(4);
    const Tensor& z = ctx->input(5);
    const Tensor& rank_now = ctx->input(6);
    if (!(x.dims() == 2 && factors.dims() == 1 && kernel.dims() == 2 && bias.dims() == 1 &&
          margin.dims() == 0 && z.dims() == 2 && rank_now.dims() == 0)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "LrcGatedLayer expects x [batch, input_dim], factors [rank·(input_dim + units)], kernel "
          "[units, input_dim], bias [units], a scalar margin, z [rows <= batch, units] and a scalar "
          "rank_now; got", InputShapes(ctx, names)));
    }
    args->batch = x.dim_size(0);
    args->input_dim = x.dim_size(1);
    args->units = kernel.dim_size(0);
    args->rank = rank_;
    if (!(kernel.dim_size(1) == args->input_dim && bias.dim_size(0) == args->units &&
          z.dim_size(1) == args->units && z.dim_size(0) <= args->batch)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "LrcGatedLayer: mismatched dimensions: input_dim must agree between x[1] and kernel[1], "
          "units between kernel[0], bias[0] and z[1], and z may have at most x's rows; got",
          InputShapes(ctx, names)));
    }
    // Host memory on every device (the registrations below).
    const int32_t traced_for = rank_now.scalar<int32_t>()();
    const int64_t expected = rank_ * (args->input_dim + args->units);
    if (traced_for != rank_ || factors.dim_size(0) != expected) {
      return absl::InvalidArgumentError(absl::StrCat(
          layer_.empty() ? "LrcGatedLayer" : layer_, ": set_rank changed the rank of the estimator "
          "after this function was traced; compile the model again (model.compile(...)) before "
          "predict, evaluate or fit (traced for rank ", rank_, ", which needs ", expected,
          " factors for input_dim ", args->input_dim, " and units ", args->units, "; the layer has rank ",
          traced_for, " and ", factors.dim_size(0), " factors)"));
    }
    args->margin = margin.scalar<float>()();
    if (!std::isfinite(args->margin)) {
      return absl::InvalidArgumentError(
          absl::StrCat("LrcGatedLayer: margin must be finite, got ", args->margin));
    }
    args->dense_rows = z.dim_size(0);
    args->sample_rows = std::min<int64_t>(sample_rows_, args->dense_rows);
    args->x = x.flat<float>().data();
    args->factors = factors.flat<float>().data();
    args->kernel = kernel.flat<float>().data();
    args->bias = bias.flat<float>().data();
    args->z = z.flat<float>().data();
    return absl::OkStatus();
  }

  int64_t rank_;
  int64_t sample_rows_;
  std::string layer_;
};

}  // namespace

REGISTER_KERNEL_BUILDER(Name("LrcGatedLayer").Device(::tensorflow::DEVICE_CPU),
                        GatedLayerOpKernel<Eigen::ThreadPoolDevice>);
#if GOOGLE_CUDA
// Prepare reads margin and rank_now on the host, on every device.
REGISTER_KERNEL_BUILDER(
    Name("LrcGatedLayer").Device(::tensorflow::DEVICE_GPU).HostMemory("margin").HostMemory("rank_now"),
    GatedLayerOpKernel<Eigen::GpuDevice>);
#endif

}  // namespace lrc
