// The inputs' names and shapes, for the error messages of the OpKernels: " (x [4,5], kernel [7,5])".
#ifndef LRC_KERAS_CUSTOM_OPS_INPUT_SHAPES_H_
#define LRC_KERAS_CUSTOM_OPS_INPUT_SHAPES_H_

#include <initializer_list>
#include <string>

#include "tensorflow/core/framework/op_kernel.h"

namespace lrc {

// `names` name the op's inputs in order, from the first.
inline std::string InputShapes(tensorflow::OpKernelContext* ctx, std::initializer_list<const char*> names) {
  std::string text = " (";
  int index = 0;
  for (const char* name : names) {
    absl::StrAppend(&text, index ? ", " : "", name, " ", ctx->input(index).shape().DebugString());
    ++index;
  }
  return text + ")";
}

}  // namespace lrc

#endif  // LRC_KERAS_CUSTOM_OPS_INPUT_SHAPES_H_
