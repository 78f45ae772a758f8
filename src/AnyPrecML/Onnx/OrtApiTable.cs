using System.Runtime.InteropServices;

namespace AnyPrecML.Onnx;

/// <summary>
/// The few entries of ONNX Runtime's C function table (<c>OrtApi</c> in onnxruntime_c_api.h) that a custom
/// operator written in C# needs, reached through <c>OrtGetApiBase</c> in the native library the
/// Microsoft.ML.OnnxRuntime package already loads: no native shim of our own. The table only grows at its
/// end, so these indices hold for every runtime at or after <see cref="ApiVersion"/>; a test checks them
/// against the managed package's own declaration of the table.
/// </summary>
internal static unsafe class OrtApiTable
{
    /// <summary>The C API version requested (ONNX Runtime 1.20); the custom operator struct is filled to it.</summary>
    public const uint ApiVersion = 20;

    internal const int CreateStatusIndex = 0;
    internal const int GetErrorMessageIndex = 2;
    internal const int CreateCustomOpDomainIndex = 26;
    internal const int CustomOpDomainAddIndex = 27;
    internal const int AddCustomOpDomainIndex = 28;
    internal const int GetTensorMutableDataIndex = 51;
    internal const int GetTensorElementTypeIndex = 60;
    internal const int GetDimensionsCountIndex = 61;
    internal const int GetDimensionsIndex = 62;
    internal const int GetTensorTypeAndShapeIndex = 65;
    internal const int KernelInfoGetAttributeInt64Index = 86;
    internal const int KernelInfoGetAttributeStringIndex = 87;
    internal const int KernelContextGetInputIndex = 90;
    internal const int KernelContextGetOutputIndex = 91;
    internal const int ReleaseStatusIndex = 93;
    internal const int ReleaseTensorTypeAndShapeInfoIndex = 99;
    internal const int ReleaseCustomOpDomainIndex = 101;

    /// <summary>OrtErrorCode values used in statuses we create.</summary>
    public const int OrtFail = 1, OrtInvalidArgument = 2;

    [StructLayout(LayoutKind.Sequential)]
    private struct OrtApiBase
    {
        public delegate* unmanaged<uint, void**> GetApi;
        public delegate* unmanaged<byte*> GetVersionString;
    }

    [DllImport("onnxruntime", EntryPoint = "OrtGetApiBase")]
    private static extern OrtApiBase* OrtGetApiBase();

    private static readonly Lazy<nint> LazyTable = new(Load);

    private static nint Load()
    {
        // Let the managed package load and initialise its native library first, so both use the same one.
        _ = Microsoft.ML.OnnxRuntime.OrtEnv.Instance();
        var b = OrtGetApiBase();
        void** api = b->GetApi(ApiVersion);
        if (api == null)
            throw new PlatformNotSupportedException($"ONNX Runtime {Marshal.PtrToStringUTF8((nint)b->GetVersionString())} does not offer C API version {ApiVersion}; AnyPrecML needs ONNX Runtime 1.20 or later.");
        return (nint)api;
    }

    /// <summary>The OrtApi table (an array of function pointers).</summary>
    public static void** Table => (void**)LazyTable.Value;

    /// <summary>The native <c>const OrtApi*</c>.</summary>
    public static nint Pointer => LazyTable.Value;

    public static void* CreateStatus(int code, string message)
    {
        var bytes = System.Text.Encoding.UTF8.GetBytes(message + "\0");
        fixed (byte* m = bytes) return ((delegate* unmanaged<int, byte*, void*>)Table[CreateStatusIndex])(code, m);
    }

    /// <summary>Throws with the status's message when <paramref name="status"/> is an error, releasing it.</summary>
    public static void Check(void* status, string what)
    {
        if (status == null) return;
        string message = Marshal.PtrToStringUTF8((nint)((delegate* unmanaged<void*, byte*>)Table[GetErrorMessageIndex])(status)) ?? "unknown error";
        ((delegate* unmanaged<void*, void>)Table[ReleaseStatusIndex])(status);
        throw new InvalidOperationException($"ONNX Runtime failed to {what}: {message}");
    }

    public static void* CreateCustomOpDomain(string name)
    {
        var bytes = System.Text.Encoding.UTF8.GetBytes(name + "\0");
        void* domain;
        fixed (byte* n = bytes) Check(((delegate* unmanaged<byte*, void**, void*>)Table[CreateCustomOpDomainIndex])(n, &domain), "create a custom operator domain");
        return domain;
    }

    public static void CustomOpDomainAdd(void* domain, void* op) =>
        Check(((delegate* unmanaged<void*, void*, void*>)Table[CustomOpDomainAddIndex])(domain, op), "add a custom operator");

    public static void AddCustomOpDomain(nint sessionOptions, void* domain) =>
        Check(((delegate* unmanaged<nint, void*, void*>)Table[AddCustomOpDomainIndex])(sessionOptions, domain), "add a custom operator domain to the session options");

    public static void ReleaseCustomOpDomain(void* domain) => ((delegate* unmanaged<void*, void>)Table[ReleaseCustomOpDomainIndex])(domain);

    /// <summary>A string attribute of the node a kernel is created for; null when the node lacks it.</summary>
    public static string? KernelInfoString(void* info, string name)
    {
        var key = System.Text.Encoding.UTF8.GetBytes(name + "\0");
        var f = (delegate* unmanaged<void*, byte*, byte*, nuint*, void*>)Table[KernelInfoGetAttributeStringIndex];
        fixed (byte* k = key)
        {
            nuint size = 0;
            var status = f(info, k, null, &size); // asks for the size (including the terminating zero)
            if (status != null) { ((delegate* unmanaged<void*, void>)Table[ReleaseStatusIndex])(status); return null; }
            var buffer = new byte[(int)size];
            fixed (byte* b = buffer) Check(f(info, k, b, &size), $"read attribute '{name}'");
            return System.Text.Encoding.UTF8.GetString(buffer, 0, Math.Max(0, (int)size - 1));
        }
    }

    public static void* KernelInput(void* context, int index)
    {
        void* value;
        Check(((delegate* unmanaged<void*, nuint, void**, void*>)Table[KernelContextGetInputIndex])(context, (nuint)index, &value), $"get input {index}");
        return value;
    }

    public static void* KernelOutput(void* context, int index, ReadOnlySpan<long> dims)
    {
        void* value;
        fixed (long* d = dims)
            Check(((delegate* unmanaged<void*, nuint, long*, nuint, void**, void*>)Table[KernelContextGetOutputIndex])(context, (nuint)index, d, (nuint)dims.Length, &value), $"allocate output {index}");
        return value;
    }

    /// <summary>An int64 attribute of the node a kernel is created for; null when the node lacks it.</summary>
    public static long? KernelInfoInt64(void* info, string name)
    {
        var key = System.Text.Encoding.UTF8.GetBytes(name + "\0");
        long value;
        fixed (byte* k = key)
        {
            var status = ((delegate* unmanaged<void*, byte*, long*, void*>)Table[KernelInfoGetAttributeInt64Index])(info, k, &value);
            if (status != null) { ((delegate* unmanaged<void*, void>)Table[ReleaseStatusIndex])(status); return null; }
        }
        return value;
    }

    /// <summary>Writes the dimensions of a tensor value into <paramref name="dims"/> (no allocation) and returns its rank.</summary>
    public static int Shape(void* value, Span<long> dims) => Shape(value, dims, out _);

    /// <summary><see cref="Shape(void*, Span{long})"/>, and the tensor's element type (ONNX's numbering: 1 float, 16 bfloat16).</summary>
    public static int Shape(void* value, Span<long> dims, out int elementType)
    {
        void* info;
        Check(((delegate* unmanaged<void*, void**, void*>)Table[GetTensorTypeAndShapeIndex])(value, &info), "read a tensor's shape");
        try
        {
            int type;
            Check(((delegate* unmanaged<void*, int*, void*>)Table[GetTensorElementTypeIndex])(info, &type), "read a tensor's element type");
            elementType = type;
            nuint count;
            Check(((delegate* unmanaged<void*, nuint*, void*>)Table[GetDimensionsCountIndex])(info, &count), "read a tensor's rank");
            if ((int)count > dims.Length) throw new ArgumentException($"a tensor of rank {count} is more than the {dims.Length} dimensions expected.");
            fixed (long* d = dims) Check(((delegate* unmanaged<void*, long*, nuint, void*>)Table[GetDimensionsIndex])(info, d, count), "read a tensor's dimensions");
            return (int)count;
        }
        finally { ((delegate* unmanaged<void*, void>)Table[ReleaseTensorTypeAndShapeInfoIndex])(info); }
    }

    public static void* TensorData(void* value)
    {
        void* data;
        Check(((delegate* unmanaged<void*, void**, void*>)Table[GetTensorMutableDataIndex])(value, &data), "get a tensor's data");
        return data;
    }
}
