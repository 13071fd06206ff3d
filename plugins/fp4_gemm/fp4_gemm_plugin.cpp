// IPluginV3 FP4 GEMM plugin: see fp4_gemm_plugin.h. Every name and rule comes from the generated
// fp4_gemm_description.h; nothing here restates the description file.
#include "fp4_gemm_plugin.h"

#include "fp4_gemm_kernels.h"

#include <cstring>
#include <exception>
#include <iostream>
#include <memory>

using namespace nvinfer1;
namespace desc = fp4_gemm_desc;

namespace fp4_gemm
{
namespace
{
constexpr int32_t kFailure = -1;
constexpr int32_t kUnknownDim = -1;

void logError(char const* message) noexcept
{
    std::cerr << "[" << desc::kPluginName << "] " << message << std::endl;
}

DataType toTensorRT(desc::TypeName type)
{
    switch (type)
    {
    case desc::TypeName::kFLOAT16: return DataType::kHALF;
    case desc::TypeName::kBFLOAT16: return DataType::kBF16;
    case desc::TypeName::kUINT8: return DataType::kUINT8;
    case desc::TypeName::kFP8E4M3: return DataType::kFP8;
    case desc::TypeName::kFLOAT: return DataType::kFLOAT;
    }
    return DataType::kFLOAT;
}

//! Column of the description's type table for tensor `pos` of a node with `nbInputs` inputs
//! (the absent optional bias shifts the output's column).
int32_t typeColumn(int32_t pos, int32_t nbInputs)
{
    return pos < nbInputs ? pos : desc::kNbInputs + (pos - nbInputs);
}

int32_t readInt(PluginField const& field)
{
    if (field.type == PluginFieldType::kINT64)
        return static_cast<int32_t>(*static_cast<int64_t const*>(field.data));
    return *static_cast<int32_t const*>(field.data);
}

int64_t rowsOf(Dims const& dims)
{
    int64_t rows = 1;
    for (int32_t i = 0; i + 1 < dims.nbDims; ++i)
        rows *= dims.d[i];
    return rows;
}
} // namespace

Fp4GemmPlugin::Fp4GemmPlugin(int32_t k, int32_t n, int32_t blockSize)
    : mK(k)
    , mN(n)
    , mBlockSize(blockSize)
{
    initFieldsToSerialize();
}

Fp4GemmPlugin::Fp4GemmPlugin(Fp4GemmPlugin const& other)
    : IPluginV3(other)
    , IPluginV3OneCore(other)
    , IPluginV3OneBuild(other)
    , IPluginV3OneRuntime(other)
    , mK(other.mK)
    , mN(other.mN)
    , mBlockSize(other.mBlockSize)
    , mHasBias(other.mHasBias)
{
    initFieldsToSerialize();  // the fields point at this object's members, not the other's
}

void Fp4GemmPlugin::initFieldsToSerialize()
{
    mFields.clear();
    mFields.emplace_back(desc::kAttrK, &mK, PluginFieldType::kINT32, 1);
    mFields.emplace_back(desc::kAttrN, &mN, PluginFieldType::kINT32, 1);
    mFields.emplace_back(desc::kAttrBlockSize, &mBlockSize, PluginFieldType::kINT32, 1);
    mFieldCollection.nbFields = static_cast<int32_t>(mFields.size());
    mFieldCollection.fields = mFields.data();
}

IPluginCapability* Fp4GemmPlugin::getCapabilityInterface(PluginCapabilityType type) noexcept
{
    switch (type)
    {
    case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
    case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
    }
    return nullptr;
}

IPluginV3* Fp4GemmPlugin::clone() noexcept
{
    try
    {
        return new Fp4GemmPlugin(*this);
    }
    catch (std::exception const& error)
    {
        logError(error.what());
    }
    return nullptr;
}

char const* Fp4GemmPlugin::getPluginName() const noexcept
{
    return desc::kPluginName;
}

char const* Fp4GemmPlugin::getPluginVersion() const noexcept
{
    return desc::kPluginVersion;
}

char const* Fp4GemmPlugin::getPluginNamespace() const noexcept
{
    return desc::kPluginNamespace;
}

int32_t Fp4GemmPlugin::getNbOutputs() const noexcept
{
    return desc::kNbOutputs;
}

int32_t Fp4GemmPlugin::configurePlugin(
    DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept
{
    if (nbInputs < desc::kNbRequiredInputs || nbInputs > desc::kNbInputs || nbOutputs != desc::kNbOutputs)
        return kFailure;
    Dims const& x = in[desc::kInputX].desc.dims;
    Dims const& w = in[desc::kInputWPacked].desc.dims;
    Dims const& s = in[desc::kInputScales].desc.dims;
    int32_t const kLast = x.d[x.nbDims - 1];
    bool const kMatches = kLast == kUnknownDim || kLast == mK;
    bool const wMatches = w.nbDims == 2 && w.d[0] == mN && 2 * w.d[1] == mK;
    bool const sMatches = s.nbDims == 2 && s.d[0] == mN && s.d[1] * mBlockSize == mK;
    if (!kMatches || !wMatches || !sMatches || mK % desc::kKMultiple != 0 || mBlockSize != desc::kDefaultBlockSize)
    {
        logError("input shapes disagree with the attributes k, n, block_size");
        return kFailure;
    }
    mHasBias = nbInputs > desc::kInputBias;
    return 0;
}

bool Fp4GemmPlugin::supportsFormatCombination(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    if (inOut[pos].desc.format != TensorFormat::kLINEAR)
        return false;
    // TensorRT asks position by position; earlier positions are already fixed: the row must match them too
    for (int32_t row = 0; row < desc::kNbTypeCombinations; ++row)
    {
        bool matches = true;
        for (int32_t p = 0; p <= pos && matches; ++p)
            matches = inOut[p].desc.type == toTensorRT(desc::kTypeCombinations[row][typeColumn(p, nbInputs)]);
        if (matches)
            return true;
    }
    return false;
}

int32_t Fp4GemmPlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    if (nbOutputs != desc::kNbOutputs || nbInputs < desc::kNbRequiredInputs)
        return kFailure;
    outputTypes[0] = inputTypes[desc::kInputX];  // Y in X's type
    return 0;
}

int32_t Fp4GemmPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const* /*shapeInputs*/,
    int32_t /*nbShapeInputs*/, DimsExprs* outputs, int32_t nbOutputs, IExprBuilder& /*exprBuilder*/) noexcept
{
    DimsExprs const& x = inputs[desc::kInputX];
    if (nbInputs < desc::kNbRequiredInputs || nbOutputs != desc::kNbOutputs || x.nbDims < desc::kXMinRank
        || x.nbDims > desc::kXMaxRank || inputs[desc::kInputWPacked].nbDims != 2)
        return kFailure;
    outputs[0] = x;  // dynamic M: every leading dimension passes through
    outputs[0].d[x.nbDims - 1] = inputs[desc::kInputWPacked].d[0];
    return 0;
}

int32_t Fp4GemmPlugin::onShapeChange(
    PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept
{
    Dims const& x = in[desc::kInputX].dims;
    bool const ok = nbInputs >= desc::kNbRequiredInputs && nbOutputs == desc::kNbOutputs && x.d[x.nbDims - 1] == mK;
    mHasBias = nbInputs > desc::kInputBias;  // the runtime phase learns it here (not serialized)
    return ok ? 0 : kFailure;
}

int32_t Fp4GemmPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* /*outputDesc*/,
    void const* const* inputs, void* const* outputs, void* /*workspace*/, cudaStream_t stream) noexcept
{
    int const dtype = inputDesc[desc::kInputX].type == DataType::kBF16 ? FP4_GEMM_BFLOAT16 : FP4_GEMM_FLOAT16;
    // the bias is the optional last input: present when TensorRT hands its descriptor over
    void const* bias = mHasBias ? inputs[desc::kInputBias] : nullptr;
    int const status = fp4_gemm_run(dtype, inputs[desc::kInputX], static_cast<uint8_t const*>(inputs[desc::kInputWPacked]),
        static_cast<uint8_t const*>(inputs[desc::kInputScales]), static_cast<float const*>(inputs[desc::kInputGlobalScale]),
        bias, outputs[0], rowsOf(inputDesc[desc::kInputX].dims), mN, mK, stream);
    return status == FP4_GEMM_OK ? 0 : kFailure;
}

IPluginV3* Fp4GemmPlugin::attachToContext(IPluginResourceContext* /*context*/) noexcept
{
    return clone();
}

PluginFieldCollection const* Fp4GemmPlugin::getFieldsToSerialize() noexcept
{
    return &mFieldCollection;
}

// --- creator --------------------------------------------------------------------------------------

Fp4GemmPluginCreator::Fp4GemmPluginCreator()
{
    mFieldNames.emplace_back(desc::kAttrK, nullptr, PluginFieldType::kINT32, 1);
    mFieldNames.emplace_back(desc::kAttrN, nullptr, PluginFieldType::kINT32, 1);
    mFieldNames.emplace_back(desc::kAttrBlockSize, nullptr, PluginFieldType::kINT32, 1);
    mFieldCollection.nbFields = static_cast<int32_t>(mFieldNames.size());
    mFieldCollection.fields = mFieldNames.data();
}

char const* Fp4GemmPluginCreator::getPluginName() const noexcept
{
    return desc::kPluginName;
}

char const* Fp4GemmPluginCreator::getPluginVersion() const noexcept
{
    return desc::kPluginVersion;
}

char const* Fp4GemmPluginCreator::getPluginNamespace() const noexcept
{
    return desc::kPluginNamespace;
}

PluginFieldCollection const* Fp4GemmPluginCreator::getFieldNames() noexcept
{
    return &mFieldCollection;
}

IPluginV3* Fp4GemmPluginCreator::createPlugin(
    char const* /*name*/, PluginFieldCollection const* fc, TensorRTPhase /*phase*/) noexcept
{
    try
    {
        int32_t k = 0;
        int32_t n = 0;
        int32_t blockSize = desc::kDefaultBlockSize;
        for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i)
        {
            PluginField const& field = fc->fields[i];
            if (field.data == nullptr)
                continue;
            if (std::strcmp(field.name, desc::kAttrK) == 0)
                k = readInt(field);
            else if (std::strcmp(field.name, desc::kAttrN) == 0)
                n = readInt(field);
            else if (std::strcmp(field.name, desc::kAttrBlockSize) == 0)
                blockSize = readInt(field);
        }
        if (k <= 0 || n <= 0 || k % desc::kKMultiple != 0 || blockSize != desc::kDefaultBlockSize)
        {
            logError("attributes k and n must be positive, k a multiple of 16, block_size 16");
            return nullptr;
        }
        return new Fp4GemmPlugin(k, n, blockSize);
    }
    catch (std::exception const& error)
    {
        logError(error.what());
    }
    return nullptr;
}

} // namespace fp4_gemm

// --- registration ---------------------------------------------------------------------------------

#ifndef FP4_GEMM_NO_STATIC_REGISTRATION
// Loaded with dlopen/ctypes (trtexec --staticPlugins, onnxq build --plugins): the static registrar.
using fp4_gemm::Fp4GemmPluginCreator;
REGISTER_TENSORRT_PLUGIN(Fp4GemmPluginCreator);
#endif

// Loaded through IPluginRegistry::loadLibrary (version-compatible engines, trtexec --dynamicPlugins):
// TensorRT calls these two entry points. Build with -DFP4_GEMM_NO_STATIC_REGISTRATION for that use,
// or the creator is registered twice (TensorRT then reports the duplicate).
extern "C" void setLoggerFinder(nvinfer1::ILoggerFinder* /*finder*/) {}

extern "C" nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
{
    static fp4_gemm::Fp4GemmPluginCreator creator;
    static nvinfer1::IPluginCreatorInterface* const creators[] = {&creator};
    nbCreators = 1;
    return creators;
}
