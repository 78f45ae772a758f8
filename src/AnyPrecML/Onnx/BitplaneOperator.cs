using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using AnyPrecML.Kernels;
using AnyPrecML.Quantization;
using Microsoft.ML.OnnxRuntime;

namespace AnyPrecML.Onnx;

/// <summary>
/// The <c>ai.anyprecml.BitplaneLinear</c> operator, written in C# and registered in ONNX Runtime through its C
/// function table (an <c>OrtCustomOp</c> of <c>[UnmanagedCallersOnly]</c> callbacks; no native shim). A node
/// names its layer in the <c>layer</c> attribute; its inputs are the activations x [..., cols] (fp32) and the
/// graph's <c>bits</c> (int32: one width, or one per linear of which it reads its layer's), and its output is W_b·x [..., rows]. Each kernel looks its layer up in an
/// <see cref="AnyPrecisionModel"/>, so the bitplanes stay where the model mapped them: one copy however many
/// sessions or widths use them. Exceptions never cross into native code: they become ORT error statuses,
/// which ONNX Runtime raises as <see cref="OnnxRuntimeException"/> with the message.
/// </summary>
public sealed unsafe class BitplaneOperator : IDisposable
{
    /// <summary>The custom operator domain of the exported graphs.</summary>
    public const string Domain = "ai.anyprecml";
    /// <summary>The operator's type name.</summary>
    public const string OpType = "BitplaneLinear";

    private static readonly byte* OpName = Utf8(OpType);
    private static readonly byte* CpuProvider = Utf8("CPUExecutionProvider");

    private readonly OpBlock* _op;
    private GCHandle _self;
    private void* _domain;

    /// <summary>An operator whose kernels run layers of <paramref name="model"/> on <paramref name="backend"/> (default: <see cref="BitplaneBackend.Default"/>).</summary>
    public BitplaneOperator(AnyPrecisionModel model, BitplaneBackend? backend = null)
    {
        Model = model ?? throw new ArgumentNullException(nameof(model));
        Backend = backend ?? BitplaneBackend.Default;
        _self = GCHandle.Alloc(this);
        _op = (OpBlock*)NativeMemory.AllocZeroed((nuint)sizeof(OpBlock));
        _op->Owner = GCHandle.ToIntPtr(_self);
        ref var op = ref _op->Op;
        op.Version = OrtApiTable.ApiVersion;
        op.CreateKernel = &CreateKernelV1;
        op.GetName = &GetName;
        op.GetExecutionProviderType = &GetExecutionProviderType;
        op.GetInputType = &GetInputType;
        op.GetInputTypeCount = &GetInputTypeCount;
        op.GetOutputType = &GetOutputType;
        op.GetOutputTypeCount = &GetOutputTypeCount;
        op.KernelCompute = &KernelComputeV1;
        op.KernelDestroy = &KernelDestroy;
        op.GetInputCharacteristic = &Required;
        op.GetOutputCharacteristic = &Required;
        op.GetInputMemoryType = &InputMemoryType;
        op.GetVariadicInputMinArity = &One;
        op.GetVariadicInputHomogeneity = &One;
        op.GetVariadicOutputMinArity = &One;
        op.GetVariadicOutputHomogeneity = &One;
        op.CreateKernelV2 = &CreateKernelV2;
        op.KernelComputeV2 = &KernelComputeV2;
        op.GetStartVersion = &StartVersion;
        op.GetEndVersion = &EndVersion;
        _domain = OrtApiTable.CreateCustomOpDomain(Domain);
        OrtApiTable.CustomOpDomainAdd(_domain, _op);
    }

    /// <summary>The model whose layers the kernels run.</summary>
    public AnyPrecisionModel Model { get; }

    /// <summary>Where the products run.</summary>
    public BitplaneBackend Backend { get; }

    /// <summary>Kernel calls so far (all sessions); with <see cref="KernelTicks"/> it separates kernel time from ORT's.</summary>
    public long KernelCalls => Interlocked.Read(ref _calls);

    /// <summary>Stopwatch ticks spent inside <see cref="BitplaneBackend.Multiply"/> so far.</summary>
    public long KernelTicks => Interlocked.Read(ref _ticks);

    private long _calls, _ticks;

    /// <summary>Adds the operator's domain to <paramref name="options"/>; keep this object alive while sessions made with them run.</summary>
    public void Register(SessionOptions options)
    {
        ArgumentNullException.ThrowIfNull(options);
        ObjectDisposedException.ThrowIf(_domain == null, this);
        OrtApiTable.AddCustomOpDomain(options.DangerousGetHandle(), _domain);
    }

    /// <summary>Releases the domain and the native operator; call after every session using them is disposed.</summary>
    public void Dispose()
    {
        if (_domain == null) return;
        OrtApiTable.ReleaseCustomOpDomain(_domain);
        _domain = null;
        NativeMemory.Free(_op);
        _self.Free();
    }

    /// <summary>One layer's kernel: its matrix, resolved once when the session is created.</summary>
    private sealed class Kernel(BitplaneOperator owner, BitplaneMatrix weight, int index)
    {
        public void Compute(void* context)
        {
            void* xv = OrtApiTable.KernelInput(context, 0);
            void* bv = OrtApiTable.KernelInput(context, 1);
            Span<long> dims = stackalloc long[8];
            int rank = OrtApiTable.Shape(xv, dims);
            dims = dims[..rank];
            if (rank == 0 || dims[^1] != weight.Cols)
                throw new ArgumentException($"{weight.Name}: input of shape [{string.Join(", ", dims.ToArray())}] does not end in its {weight.Cols} columns.");
            long tokens = 1;
            for (int i = 0; i < rank - 1; i++) tokens *= dims[i];
            Span<long> bitsDims = stackalloc long[8];
            long bitsCount = 1;
            foreach (long d in bitsDims[..OrtApiTable.Shape(bv, bitsDims)]) bitsCount *= d;
            // One width for every linear, or one per linear (a precision profile), of which this layer reads its own.
            if (bitsCount != 1 && bitsCount != owner.Model.LinearCount)
                throw new ArgumentException($"{weight.Name}: 'bits' must hold one int32 or one per linear ({owner.Model.LinearCount}), not {bitsCount} values.");
            int bits = ((int*)OrtApiTable.TensorData(bv))[bitsCount == 1 ? 0 : index];
            if (bits < weight.SeedBits || bits > weight.ParentBits)
                throw new ArgumentOutOfRangeException("bits", bits, $"bits {bits} is outside this model's {weight.SeedBits}..{weight.ParentBits}.");
            dims[^1] = weight.Rows;
            void* yv = OrtApiTable.KernelOutput(context, 0, dims);
            if (tokens == 0) return;
            var x = new ReadOnlySpan<float>(OrtApiTable.TensorData(xv), checked((int)(tokens * weight.Cols)));
            var y = new Span<float>(OrtApiTable.TensorData(yv), checked((int)(tokens * weight.Rows)));
            long start = System.Diagnostics.Stopwatch.GetTimestamp();
            owner.Backend.Multiply(weight, bits, x, (int)tokens, y);
            Interlocked.Add(ref owner._ticks, System.Diagnostics.Stopwatch.GetTimestamp() - start);
            Interlocked.Increment(ref owner._calls);
        }
    }

    private static BitplaneOperator Owner(OrtCustomOp* op) => (BitplaneOperator)GCHandle.FromIntPtr(((OpBlock*)op)->Owner).Target!;

    private static Kernel NewKernel(OrtCustomOp* op, void* info)
    {
        var owner = Owner(op);
        string layer = OrtApiTable.KernelInfoString(info, "layer")
            ?? throw new ArgumentException($"a {OpType} node has no 'layer' attribute naming its weight.");
        BitplaneMatrix weight;
        int index;
        try { weight = owner.Model.Linear(index = owner.Model.LinearIndex(layer)); }
        catch (Exception e) when (e is KeyNotFoundException or ArgumentException)
        {
            throw new ArgumentException($"{OpType}: unknown layer '{layer}': the any-precision model has no such quantized linear.", e);
        }
        // The exporter records each layer's shape: a graph written for another model fails here, not mid-run.
        if (OrtApiTable.KernelInfoInt64(info, "rows") is long rows && rows != weight.Rows
            || OrtApiTable.KernelInfoInt64(info, "cols") is long cols && cols != weight.Cols)
            throw new ArgumentException($"{OpType} node for '{layer}' expects [{OrtApiTable.KernelInfoInt64(info, "rows")}, {OrtApiTable.KernelInfoInt64(info, "cols")}]; the model's layer is [{weight.Rows}, {weight.Cols}].");
        return new Kernel(owner, weight, index);
    }

    [UnmanagedCallersOnly]
    private static void* CreateKernelV2(OrtCustomOp* op, void* api, void* info, void** kernel)
    {
        try
        {
            *kernel = (void*)GCHandle.ToIntPtr(GCHandle.Alloc(NewKernel(op, info)));
            return null;
        }
        catch (Exception e) { *kernel = null; return OrtApiTable.CreateStatus(OrtApiTable.OrtInvalidArgument, e.Message); }
    }

    [UnmanagedCallersOnly]
    private static void* KernelComputeV2(void* kernel, void* context)
    {
        try
        {
            ((Kernel)GCHandle.FromIntPtr((nint)kernel).Target!).Compute(context);
            return null;
        }
        catch (Exception e)
        {
            int code = e is ArgumentException ? OrtApiTable.OrtInvalidArgument : OrtApiTable.OrtFail;
            return OrtApiTable.CreateStatus(code, e.Message);
        }
    }

    // The version-1 entry points only run on runtimes that ignore the V2 ones (older than this library
    // supports); they exist so the struct is complete, and cannot report errors, so they log and give up.
    [UnmanagedCallersOnly]
    private static void* CreateKernelV1(OrtCustomOp* op, void* api, void* info)
    {
        try { return (void*)GCHandle.ToIntPtr(GCHandle.Alloc(NewKernel(op, info))); }
        catch (Exception e) { Console.Error.WriteLine($"AnyPrecML: {e.Message}"); return null; }
    }

    [UnmanagedCallersOnly]
    private static void KernelComputeV1(void* kernel, void* context)
    {
        try { ((Kernel)GCHandle.FromIntPtr((nint)kernel).Target!).Compute(context); }
        catch (Exception e) { Console.Error.WriteLine($"AnyPrecML: {e.Message}"); }
    }

    [UnmanagedCallersOnly]
    private static void KernelDestroy(void* kernel)
    {
        if (kernel != null) GCHandle.FromIntPtr((nint)kernel).Free();
    }

    [UnmanagedCallersOnly] private static byte* GetName(OrtCustomOp* op) => OpName;
    [UnmanagedCallersOnly] private static byte* GetExecutionProviderType(OrtCustomOp* op) => CpuProvider;
    // ONNXTensorElementDataType: 1 = float, 6 = int32.
    [UnmanagedCallersOnly] private static int GetInputType(OrtCustomOp* op, nuint index) => index == 0 ? 1 : 6;
    [UnmanagedCallersOnly] private static nuint GetInputTypeCount(OrtCustomOp* op) => 2;
    [UnmanagedCallersOnly] private static int GetOutputType(OrtCustomOp* op, nuint index) => 1;
    [UnmanagedCallersOnly] private static nuint GetOutputTypeCount(OrtCustomOp* op) => 1;
    [UnmanagedCallersOnly] private static int Required(OrtCustomOp* op, nuint index) => 0; // INPUT_OUTPUT_REQUIRED
    // 'bits' is read by the host: ask for it in CPU memory (OrtMemTypeCPUInput) even under another provider.
    [UnmanagedCallersOnly] private static int InputMemoryType(OrtCustomOp* op, nuint index) => index == 1 ? -2 : 0;
    [UnmanagedCallersOnly] private static int One(OrtCustomOp* op) => 1;
    [UnmanagedCallersOnly] private static int StartVersion(OrtCustomOp* op) => 1;
    [UnmanagedCallersOnly] private static int EndVersion(OrtCustomOp* op) => int.MaxValue;

    private static byte* Utf8(string s)
    {
        var bytes = System.Text.Encoding.UTF8.GetBytes(s + "\0");
        var p = (byte*)NativeMemory.Alloc((nuint)bytes.Length); // lives for the process, as ORT may ask at any time
        bytes.CopyTo(new Span<byte>(p, bytes.Length));
        return p;
    }

    /// <summary>OrtCustomOp as onnxruntime_c_api.h lays it out (fields up to API version 20).</summary>
    [StructLayout(LayoutKind.Sequential)]
    private struct OrtCustomOp
    {
        public uint Version;
        public delegate* unmanaged<OrtCustomOp*, void*, void*, void*> CreateKernel;
        public delegate* unmanaged<OrtCustomOp*, byte*> GetName;
        public delegate* unmanaged<OrtCustomOp*, byte*> GetExecutionProviderType;
        public delegate* unmanaged<OrtCustomOp*, nuint, int> GetInputType;
        public delegate* unmanaged<OrtCustomOp*, nuint> GetInputTypeCount;
        public delegate* unmanaged<OrtCustomOp*, nuint, int> GetOutputType;
        public delegate* unmanaged<OrtCustomOp*, nuint> GetOutputTypeCount;
        public delegate* unmanaged<void*, void*, void> KernelCompute;
        public delegate* unmanaged<void*, void> KernelDestroy;
        public delegate* unmanaged<OrtCustomOp*, nuint, int> GetInputCharacteristic;
        public delegate* unmanaged<OrtCustomOp*, nuint, int> GetOutputCharacteristic;
        public delegate* unmanaged<OrtCustomOp*, nuint, int> GetInputMemoryType;
        public delegate* unmanaged<OrtCustomOp*, int> GetVariadicInputMinArity;
        public delegate* unmanaged<OrtCustomOp*, int> GetVariadicInputHomogeneity;
        public delegate* unmanaged<OrtCustomOp*, int> GetVariadicOutputMinArity;
        public delegate* unmanaged<OrtCustomOp*, int> GetVariadicOutputHomogeneity;
        public delegate* unmanaged<OrtCustomOp*, void*, void*, void**, void*> CreateKernelV2;
        public delegate* unmanaged<void*, void*, void*> KernelComputeV2;
        public void* InferOutputShapeFn;
        public delegate* unmanaged<OrtCustomOp*, int> GetStartVersion;
        public delegate* unmanaged<OrtCustomOp*, int> GetEndVersion;
        public void* GetMayInplace, ReleaseMayInplace, GetAliasMap, ReleaseAliasMap;
    }

    /// <summary>The struct ORT sees, followed by the handle of the managed operator it belongs to.</summary>
    [StructLayout(LayoutKind.Sequential)]
    private struct OpBlock
    {
        public OrtCustomOp Op;
        public nint Owner;
    }
}
