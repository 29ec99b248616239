// RegisterCustomOps: the library's only exported symbol. Creates the ai.mfconvert domain and
// adds every op; adding an op is one line in kOps.
#include <mutex>

#include "custom_ops.h"
#include "shift_conv.h"
#include "spatial_shift.h"

namespace {

using OpGetter = const OrtCustomOp* (*)();

constexpr OpGetter kOps[] = {
    mfconvert::ShiftLinearCustomOp,
    mfconvert::AddLinearAttentionCustomOp,
    mfconvert::ShiftConvCustomOp,
    mfconvert::AdderConvCustomOp,
    mfconvert::SpatialShiftCustomOp,
};

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  Ort::InitApi(api_base->GetApi(ORT_API_VERSION));
  // ORT keeps a pointer to the domain, so it lives as long as the process.
  static Ort::CustomOpDomain* domain = nullptr;
  static std::mutex mutex;
  try {
    std::lock_guard<std::mutex> lock(mutex);
    if (domain == nullptr) {
      auto* d = new Ort::CustomOpDomain(mfconvert::kDomain);
      for (OpGetter op : kOps) d->Add(op());
      domain = d;
    }
    Ort::UnownedSessionOptions(options).Add(*domain);
  } catch (const Ort::Exception& e) {
    return Ort::GetApi().CreateStatus(e.GetOrtErrorCode(), e.what());
  } catch (const std::exception& e) {
    return Ort::GetApi().CreateStatus(ORT_FAIL, e.what());
  }
  return nullptr;
}
