using System.Numerics.Tensors;
using System.Runtime.CompilerServices;
using AnyPrecML.Onnx;
using AnyPrecML.Onnx.Proto;
using Microsoft.ML.OnnxRuntime;
using Microsoft.ML.OnnxRuntime.Tensors;

namespace AnyPrecML.Kernels;

/// <summary>A linear layer y = W·x over several tokens, for side-by-side benchmarks of the bitplane kernels.</summary>
public interface IBenchmarkLinear : IDisposable
{
    /// <summary>Output rows.</summary>
    int Rows { get; }
    /// <summary>Input columns.</summary>
    int Cols { get; }
    /// <summary>y[t, r] = Σ_j W[r, j] · x[t, j].</summary>
    void Multiply(ReadOnlySpan<float> x, int tokens, Span<float> y);
}

/// <summary>Dense fp32: TensorPrimitives dot products over rows split among the kernel thread pool (the fp32 baseline).</summary>
public sealed unsafe class DenseLinear(float[] weight, int rows, int cols, KernelThreadPool? pool = null) : IBenchmarkLinear
{
    private readonly KernelThreadPool _pool = pool ?? KernelThreadPool.Shared;
    private readonly Job _job = new(weight, rows, cols);

    /// <inheritdoc/>
    public int Rows => rows;
    /// <inheritdoc/>
    public int Cols => cols;

    /// <inheritdoc/>
    public void Multiply(ReadOnlySpan<float> x, int tokens, Span<float> y)
    {
        fixed (float* xp = x, yp = y)
        {
            _job.X = xp; _job.Y = yp; _job.Tokens = tokens;
            _pool.Run(_job, rows, Math.Max(4, rows / (_pool.Threads * 8)));
        }
    }

    private sealed class Job(float[] w, int rows, int cols) : IRangeJob
    {
        public float* X, Y;
        public int Tokens;
        [MethodImpl(MethodImplOptions.AggressiveOptimization)]
        public void Execute(int start, int end)
        {
            for (int r = start; r < end; r++)
            {
                var wr = new ReadOnlySpan<float>(w, r * cols, cols);
                for (int t = 0; t < Tokens; t++) Y[(long)t * rows + r] = TensorPrimitives.Dot(wr, new ReadOnlySpan<float>(X + (long)t * cols, cols));
            }
        }
    }

    /// <inheritdoc/>
    public void Dispose() { }
}

/// <summary>
/// ONNX Runtime's MatMulNBits (com.microsoft): uniform 4-bit weights in blocks of 32 with fp32 scales,
/// in one graph of <c>layers</c> nodes that all read the same input (one session, so one thread pool, however
/// many layers); accuracy level 0 computes in fp32, level 4 quantizes activations to int8.
/// </summary>
public sealed unsafe class MatMulNBitsLinear : IBenchmarkLinear
{
    private readonly InferenceSession _session;
    private readonly RunOptions _run = new();
    private readonly string[] _outputNames;
    private readonly float[][] _spare;

    /// <summary>Random 4-bit weights of [rows, cols] (<paramref name="layers"/> of them) at <paramref name="accuracyLevel"/>, run on <paramref name="threads"/> threads.</summary>
    public MatMulNBitsLinear(int rows, int cols, int accuracyLevel, int threads, int seed = 1, int layers = 1)
    {
        const int Block = 32;
        if (cols % Block != 0) throw new ArgumentException($"cols {cols} must be a multiple of {Block}.", nameof(cols));
        ArgumentOutOfRangeException.ThrowIfLessThan(layers, 1);
        Rows = rows; Cols = cols; AccuracyLevel = accuracyLevel;
        int blocks = cols / Block;
        var rng = new Random(seed);
        var g = new OnnxGraphBuilder("matmulnbits");
        g.Input("A", TensorProto.Types.DataType.Float, "M", cols);
        _outputNames = new string[layers];
        for (int l = 0; l < layers; l++)
        {
            var b = new byte[(long)rows * blocks * (Block / 2)];
            rng.NextBytes(b);
            var scales = new float[rows * blocks];
            for (int i = 0; i < scales.Length; i++) scales[i] = 0.001f + (float)rng.NextDouble() * 0.01f;
            _outputNames[l] = g.Output($"Y{l}", TensorProto.Types.DataType.Float, "M", rows);
            g.Initializer($"B{l}", TensorProto.Types.DataType.Uint8, [rows, blocks, Block / 2], b);
            g.Initializer($"scales{l}", scales, rows * blocks);
            g.Node("MatMulNBits", ["A", $"B{l}", $"scales{l}"], [$"Y{l}"], "com.microsoft", null,
                ("K", (long)cols), ("N", (long)rows), ("bits", 4L), ("block_size", (long)Block), ("accuracy_level", (long)accuracyLevel));
        }
        _spare = new float[layers - 1][];
        var model = g.Build(("com.microsoft", 1));
        using var options = new SessionOptions { IntraOpNumThreads = threads, InterOpNumThreads = 1, GraphOptimizationLevel = GraphOptimizationLevel.ORT_ENABLE_ALL };
        _session = new InferenceSession(Google.Protobuf.MessageExtensions.ToByteArray(model), options);
    }

    /// <inheritdoc/>
    public int Rows { get; }
    /// <inheritdoc/>
    public int Cols { get; }
    /// <summary>MatMulNBits accuracy_level.</summary>
    public int AccuracyLevel { get; }

    /// <summary>Runs every layer on <paramref name="x"/>; <paramref name="y"/> receives the last layer's product.</summary>
    public void Multiply(ReadOnlySpan<float> x, int tokens, Span<float> y)
    {
        for (int i = 0; i < _spare.Length; i++)
            if (_spare[i] is null || _spare[i].Length < y.Length) _spare[i] = GC.AllocateArray<float>(y.Length, pinned: true);
        fixed (float* xp = x, yp = y)
        {
            using var xv = OrtValue.CreateTensorValueWithData(OrtMemoryInfo.DefaultInstance, TensorElementType.Float, [tokens, Cols], (IntPtr)xp, (long)tokens * Cols * 4);
            var outputs = new OrtValue[_outputNames.Length];
            try
            {
                for (int i = 0; i < outputs.Length; i++)
                {
                    var target = i == outputs.Length - 1 ? (IntPtr)yp : (IntPtr)Unsafe.AsPointer(ref _spare[i][0]);
                    outputs[i] = OrtValue.CreateTensorValueWithData(OrtMemoryInfo.DefaultInstance, TensorElementType.Float, [tokens, Rows], target, (long)tokens * Rows * 4);
                }
                _session.Run(_run, InputNames, [xv], _outputNames, outputs);
            }
            finally { foreach (var o in outputs) o?.Dispose(); }
        }
    }

    private static readonly string[] InputNames = ["A"];

    /// <inheritdoc/>
    public void Dispose()
    {
        _session.Dispose();
        _run.Dispose();
    }
}

/// <summary>A bitplane matrix at a fixed width through a backend, as an <see cref="IBenchmarkLinear"/>.</summary>
public sealed class BitplaneBenchmarkLinear(Quantization.BitplaneMatrix weight, int bits, BitplaneBackend backend) : IBenchmarkLinear
{
    /// <inheritdoc/>
    public int Rows => weight.Rows;
    /// <inheritdoc/>
    public int Cols => weight.Cols;
    /// <inheritdoc/>
    public void Multiply(ReadOnlySpan<float> x, int tokens, Span<float> y) => backend.Multiply(weight, bits, x, tokens, y);
    /// <inheritdoc/>
    public void Dispose() { }
}
