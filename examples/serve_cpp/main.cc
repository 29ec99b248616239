// Serve a converted model from C++ with the plain ONNX Runtime C++ API: our custom-op library is
// registered by path (RegisterCustomOpsLibrary), nothing else is needed (no Ort::CustomOpDomain).
//
//   serve_cpp MODEL.onnx LIBRARY.so INPUT.npy OUTPUT.npy [THREADS]
//
// INPUT.npy: the model's first input, float32, C order (np.save(path, x.astype(np.float32))).
// OUTPUT.npy: the model's first output, float32. LIBRARY.so: libmfconvert_ops.so, whose path
// `python -m mfconvert.ort_ops` prints. Build: see Makefile here.
#include <onnxruntime_cxx_api.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <numeric>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

// A float32 .npy file (format 1.0-3.0, little-endian '<f4', C order): shape and data.
struct Npy {
  std::vector<int64_t> shape;
  std::vector<float> data;
};

Npy read_npy(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error(path + ": cannot open");
  char magic[8];
  f.read(magic, 8);
  if (!f || std::string(magic, 6) != "\x93NUMPY") throw std::runtime_error(path + ": not a .npy file");
  uint32_t header_len = 0;
  if (magic[6] == 1) {
    unsigned char b[2];
    f.read(reinterpret_cast<char*>(b), 2);
    header_len = b[0] | (b[1] << 8);
  } else {
    unsigned char b[4];
    f.read(reinterpret_cast<char*>(b), 4);
    header_len = b[0] | (b[1] << 8) | (b[2] << 16) | (uint32_t(b[3]) << 24);
  }
  std::string header(header_len, '\0');
  f.read(&header[0], header_len);
  if (!f) throw std::runtime_error(path + ": truncated header");
  if (header.find("'descr': '<f4'") == std::string::npos)
    throw std::runtime_error(path + ": expected float32 data ('<f4'), header " + header);
  if (header.find("'fortran_order': False") == std::string::npos)
    throw std::runtime_error(path + ": expected C order");
  size_t open = header.find("'shape': (");
  size_t close = header.find(')', open);
  if (open == std::string::npos || close == std::string::npos) throw std::runtime_error(path + ": no shape");
  std::stringstream dims(header.substr(open + 10, close - open - 10));
  Npy npy;
  for (std::string d; std::getline(dims, d, ',');)
    if (d.find_first_not_of(' ') != std::string::npos) npy.shape.push_back(std::stoll(d));
  size_t n = std::accumulate(npy.shape.begin(), npy.shape.end(), size_t{1},
                             [](size_t a, int64_t b) { return a * size_t(b); });
  npy.data.resize(n);
  f.read(reinterpret_cast<char*>(npy.data.data()), std::streamsize(n * sizeof(float)));
  if (!f) throw std::runtime_error(path + ": truncated data");
  return npy;
}

void write_npy(const std::string& path, const std::vector<int64_t>& shape, const float* data, size_t n) {
  std::string dims;
  for (size_t i = 0; i < shape.size(); ++i) dims += (i ? ", " : "") + std::to_string(shape[i]);
  if (shape.size() == 1) dims += ",";  // a one-dim tuple: "(10,)"
  std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (" + dims + "), }";
  header.append(63 - (10 + header.size()) % 64, ' ');  // header + 10 magic bytes: a multiple of 64
  header += '\n';
  std::string tmp = path + ".tmp";
  std::ofstream f(tmp, std::ios::binary);
  f.write("\x93NUMPY\x01\x00", 8);
  char len[2] = {char(header.size() & 0xff), char(header.size() >> 8)};
  f.write(len, 2);
  f.write(header.data(), std::streamsize(header.size()));
  f.write(reinterpret_cast<const char*>(data), std::streamsize(n * sizeof(float)));
  f.close();
  if (!f || std::rename(tmp.c_str(), path.c_str()) != 0) throw std::runtime_error(path + ": cannot write");
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 5 || argc > 6) {
    std::cerr << "usage: " << argv[0] << " MODEL.onnx LIBRARY.so INPUT.npy OUTPUT.npy [THREADS]\n";
    return 2;
  }
  try {
    Ort::Env env(ORT_LOGGING_LEVEL_WARNING, "serve_cpp");
    Ort::SessionOptions opts;
    opts.SetIntraOpNumThreads(argc == 6 ? std::atoi(argv[5]) : 1);
    opts.SetInterOpNumThreads(1);
    opts.RegisterCustomOpsLibrary(argv[2]);  // our ops (domain ai.mfconvert); ORTCHAR_T is char on Linux
    Ort::Session session(env, argv[1], opts);

    Ort::AllocatorWithDefaultOptions alloc;
    auto in_name = session.GetInputNameAllocated(0, alloc);
    auto out_name = session.GetOutputNameAllocated(0, alloc);
    Npy x = read_npy(argv[3]);
    auto mem = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
    Ort::Value input = Ort::Value::CreateTensor<float>(mem, x.data.data(), x.data.size(), x.shape.data(),
                                                       x.shape.size());
    const char* in_names[] = {in_name.get()};
    const char* out_names[] = {out_name.get()};

    auto t0 = std::chrono::steady_clock::now();
    auto outputs = session.Run(Ort::RunOptions{nullptr}, in_names, &input, 1, out_names, 1);
    double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();

    auto info = outputs[0].GetTensorTypeAndShapeInfo();
    if (info.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
      throw std::runtime_error(std::string("output '") + out_name.get() + "' is not float32");
    std::vector<int64_t> shape = info.GetShape();
    write_npy(argv[4], shape, outputs[0].GetTensorData<float>(), info.GetElementCount());
    std::cout << in_name.get() << " -> " << out_name.get() << " [";
    for (size_t i = 0; i < shape.size(); ++i) std::cout << (i ? "," : "") << shape[i];
    std::cout << "] in " << ms << " ms -> " << argv[4] << "\n";
  } catch (const std::exception& e) {  // Ort::Exception derives from std::exception
    std::cerr << "serve_cpp: error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
