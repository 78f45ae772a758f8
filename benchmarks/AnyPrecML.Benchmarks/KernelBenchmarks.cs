using AnyPrecML.Kernels;
using AnyPrecML.Quantization;
using BenchmarkDotNet.Attributes;
using BenchmarkDotNet.Running;

BenchmarkSwitcher.FromAssembly(typeof(KernelBenchmarks).Assembly).Run(args);

/// <summary>
/// y = W·x at one shape, side by side: bitplane (fp32 and int8 accuracy) at every b, dense fp32 and ONNX Runtime's
/// MatMulNBits 4-bit, all on 2 threads. `dotnet run -c Release --project benchmarks/AnyPrecML.Benchmarks -- --filter '*'`.
/// The CLI's `anyprec bench kernels` covers every shape and the beyond-cache set; this is the same comparison
/// under BenchmarkDotNet's statistics.
/// </summary>
[MemoryDiagnoser]
public class KernelBenchmarks
{
    private KernelThreadPool _pool = null!;
    private BitplaneMatrix _matrix = null!;
    private CpuBitplaneBackend _fp32 = null!, _int8 = null!;
    private DenseLinear _dense = null!;
    private MatMulNBitsLinear _nbits4 = null!;
    private float[] _x = null!, _y = null!;

    [Params(4096)] public int Rows;
    [Params(4096)] public int Cols;
    [Params(1, 8)] public int M;

    [GlobalSetup]
    public void Setup()
    {
        _pool = new KernelThreadPool(2);
        _fp32 = new CpuBitplaneBackend(pool: _pool, accuracy: KernelAccuracy.Float32);
        _int8 = new CpuBitplaneBackend(pool: _pool, accuracy: KernelAccuracy.Int8);
        var rng = new Random(1);
        int words = (Cols + 31) / 32;
        var planes = new uint[8L * Rows * words];
        for (long i = 0; i < planes.Length; i++) planes[i] = (uint)rng.NextInt64();
        var tables = Enumerable.Range(3, 6).Select(b => Enumerable.Range(0, Rows << b).Select(i => (Half)(((i & ((1 << b) - 1)) - (1 << (b - 1))) * 0.01f)).ToArray()).ToArray();
        _matrix = BitplaneMatrix.Create("bench", Rows, Cols, 3, 8, planes, tables);
        _dense = new DenseLinear(Enumerable.Range(0, Rows * Cols).Select(i => (float)Math.Sin(i) * 0.05f).ToArray(), Rows, Cols, _pool);
        _nbits4 = new MatMulNBitsLinear(Rows, Cols, 4, 2);
        _x = Enumerable.Range(0, M * Cols).Select(i => (float)Math.Cos(i) * 0.1f).ToArray();
        _y = new float[M * Rows];
    }

    [GlobalCleanup]
    public void Cleanup()
    {
        _nbits4.Dispose();
        _pool.Dispose();
    }

    [Benchmark] [Arguments(3)] [Arguments(4)] [Arguments(8)]
    public void Bitplane(int bits) => _fp32.Multiply(_matrix, bits, _x, M, _y);

    [Benchmark] [Arguments(3)] [Arguments(8)]
    public void BitplaneInt8(int bits) => _int8.Multiply(_matrix, bits, _x, M, _y);

    [Benchmark(Baseline = true)]
    public void DenseFp32() => _dense.Multiply(_x, M, _y);

    [Benchmark]
    public void MatMulNBits4Acc4() => _nbits4.Multiply(_x, M, _y);
}
