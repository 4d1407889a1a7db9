// LrcGatedDense and LrcMaskedRelu: op registration and shape functions only, as in
// TensorFlow's custom-op template; the OpKernels are in gated_dense_kernels.cc, the contract in
// gated_dense.h.
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace lrc {
namespace {

using ::tensorflow::shape_inference::DimensionHandle;
using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;

// Both ops end with a bias [units], a [batch, units] estimate product and a scalar margin,
// and return y [batch, units] and a scalar.
absl::Status GatedOutputShapes(InferenceContext* c, DimensionHandle batch, DimensionHandle units,
                               int bias_index) {
  ShapeHandle bias, product, margin;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(bias_index), 1, &bias));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(bias_index + 1), 2, &product));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(bias_index + 2), 0, &margin));
  TF_RETURN_IF_ERROR(c->Merge(units, c->Dim(bias, 0), &units));
  TF_RETURN_IF_ERROR(c->Merge(units, c->Dim(product, 1), &units));
  TF_RETURN_IF_ERROR(c->Merge(batch, c->Dim(product, 0), &batch));
  c->set_output(0, c->Matrix(batch, units));
  c->set_output(1, c->Scalar());
  return absl::OkStatus();
}

}  // namespace

REGISTER_OP("LrcGatedDense")
    .Input("x: float")
    .Input("kernel: float")
    .Input("bias: float")
    .Input("product: float")
    .Input("margin: float")
    .Output("y: float")
    .Output("active_fraction: float")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle x, kernel;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &x));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 2, &kernel));
      DimensionHandle input_dim;
      TF_RETURN_IF_ERROR(c->Merge(c->Dim(x, 1), c->Dim(kernel, 1), &input_dim));
      return GatedOutputShapes(c, c->Dim(x, 0), c->Dim(kernel, 0), 2);
    });

REGISTER_OP("LrcMaskedRelu")
    .Input("z: float")
    .Input("bias: float")
    .Input("product: float")
    .Input("margin: float")
    .Output("y: float")
    .Output("active_fraction: float")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle z;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &z));
      return GatedOutputShapes(c, c->Dim(z, 0), c->Dim(z, 1), 1);
    });

}  // namespace lrc
