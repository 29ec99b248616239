// The ONNX Runtime C++ API as this library uses it: initialised by hand in RegisterCustomOps
// (the library does not link libonnxruntime), so every file includes the API through here.
#pragma once

#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT
