// LrcGatedLayer: op registration and shape function only, as in
// TensorFlow's custom-op template; the OpKernels are in gated_layer_kernels.cc, the contract in
// gated_layer.h.
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace lrc {

using ::tensorflow::shape_inference::DimensionHandle;
using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;

REGISTER_OP("LrcGatedLayer")
    .Input("x: float")
    .Input("factors: float")
    .Input("kernel: float")
    .Input("bias: float")
    .Input("margin: float")
    .Input("z: float")
    .Input("rank_now: int32")
    .Attr("rank: int >= 1")
    .Attr("sample_rows: int >= 0")
    .Attr("layer: string = ''")
    .Output("y: float")
    .Output("skipped: float")
    .Output("gate_counts: float")
    .Output("active_fraction: float")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle x, factors, kernel, bias, scalar, z;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &x));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 1, &factors));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 2, &kernel));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(3), 1, &bias));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(4), 0, &scalar));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(5), 2, &z));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(6), 0, &scalar));
      DimensionHandle input_dim, units;
      TF_RETURN_IF_ERROR(c->Merge(c->Dim(x, 1), c->Dim(kernel, 1), &input_dim));
      TF_RETURN_IF_ERROR(c->Merge(c->Dim(kernel, 0), c->Dim(bias, 0), &units));
      TF_RETURN_IF_ERROR(c->Merge(units, c->Dim(z, 1), &units));
      int64_t sample_rows;
      TF_RETURN_IF_ERROR(c->GetAttr("sample_rows", &sample_rows));
      DimensionHandle skipped_rows = c->UnknownDim();
      if (c->ValueKnown(c->Dim(z, 0))) {
        skipped_rows = c->MakeDim(std::min(sample_rows, c->Value(c->Dim(z, 0))));
      } else if (sample_rows == 0) {
        skipped_rows = c->MakeDim(0);
      }
      c->set_output(0, c->Matrix(c->Dim(x, 0), units));
      c->set_output(1, c->Matrix(skipped_rows, units));
      c->set_output(2, c->Vector(4));
      c->set_output(3, c->Scalar());
      return absl::OkStatus();
    });

}  // namespace lrc
