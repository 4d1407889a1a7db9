// LrcGatedDenseGrad: op registration and shape function only; the OpKernel is in
// gated_dense_grad_kernels.cc, the contract in gated_dense_grad.h.
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace lrc {

using ::tensorflow::shape_inference::DimensionHandle;
using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;

REGISTER_OP("LrcGatedDenseGrad")
    .Input("grad_y: float")
    .Input("y: float")
    .Input("grad_skipped: float")
    .Input("skipped: float")
    .Input("x: float")
    .Input("kernel: float")
    .Output("grad_x: float")
    .Output("grad_kernel: float")
    .Output("grad_bias: float")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle grad_y, y, grad_skipped, skipped, x, kernel;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &grad_y));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 2, &y));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 2, &grad_skipped));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(3), 2, &skipped));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(4), 2, &x));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(5), 2, &kernel));
      TF_RETURN_IF_ERROR(c->Merge(grad_y, y, &y));
      TF_RETURN_IF_ERROR(c->Merge(grad_skipped, skipped, &skipped));
      DimensionHandle batch, units, input_dim;
      TF_RETURN_IF_ERROR(c->Merge(c->Dim(y, 0), c->Dim(x, 0), &batch));
      TF_RETURN_IF_ERROR(c->Merge(c->Dim(y, 1), c->Dim(kernel, 0), &units));
      TF_RETURN_IF_ERROR(c->Merge(units, c->Dim(skipped, 1), &units));
      TF_RETURN_IF_ERROR(c->Merge(c->Dim(x, 1), c->Dim(kernel, 1), &input_dim));
      c->set_output(0, c->Matrix(batch, input_dim));
      c->set_output(1, c->Matrix(units, input_dim));
      c->set_output(2, c->Vector(units));
      return absl::OkStatus();
    });

}  // namespace lrc
