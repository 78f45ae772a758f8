using AnyPrecML.Kernels;
using AnyPrecML.Quantization;

namespace AnyPrecML.Tests;

[TestClass]
public sealed class KernelTests
{
    /// <summary>A random any-precision matrix (seed 3, parent 8) built through the quantizer.</summary>
    internal static BitplaneMatrix RandomMatrix(int rows, int cols, int seed)
    {
        var rng = new Random(seed);
        var ones = Enumerable.Repeat(1f, cols).ToArray();
        var q = new RowQuantization[rows];
        for (int r = 0; r < rows; r++)
        {
            var v = new float[cols];
            for (int j = 0; j < cols; j++) v[j] = (float)TestData.Gaussian(rng);
            q[r] = RowQuantizer.Quantize(v, ones, 3, 8, (ulong)r);
        }
        return BitplaneMatrix.FromRows("random", q, cols);
    }

    private static float[] RandomX(int n, int seed)
    {
        var rng = new Random(seed);
        return Enumerable.Range(0, n).Select(_ => (float)TestData.Gaussian(rng)).ToArray();
    }

    /// <summary>Checks y against a float64 dequantize-then-multiply; the error is relative to Σ|w·x| of each output (the scale of fp32 rounding in a dot product).</summary>
    private static void AssertMatchesFloat64(BitplaneMatrix m, int bits, float[] x, int tokens, float[] y, string what)
    {
        var w = m.Dequantize(bits);
        double worst = 0;
        for (int t = 0; t < tokens; t++)
            for (int r = 0; r < m.Rows; r++)
            {
                double sum = 0, abs = 0;
                for (int j = 0; j < m.Cols; j++)
                {
                    double p = (double)w[(long)r * m.Cols + j] * x[t * m.Cols + j];
                    sum += p; abs += Math.Abs(p);
                }
                worst = Math.Max(worst, Math.Abs(y[t * m.Rows + r] - sum) / Math.Max(abs, 1e-30));
            }
        Assert.IsLessThan(1e-5, worst, $"{what}: worst relative error {worst:E2}");
    }

    public static IEnumerable<object[]> Shapes => [[37, 100], [5, 543], [9, 1040], [16, 2081]];

    [TestMethod]
    [DynamicData(nameof(Shapes))]
    public void EveryCpuPathEqualsFloat64ReferenceAtEveryWidthAndTokenCount(int rows, int cols)
    {
        var m = RandomMatrix(rows, cols, rows * 31 + cols);
        Assert.Contains(KernelPath.Scalar, BitplaneKernels.SupportedPaths.ToList());
        foreach (var path in BitplaneKernels.SupportedPaths)
        {
            using var pool = new KernelThreadPool(2);
            var backend = new CpuBitplaneBackend(path, pool);
            foreach (int tokens in new[] { 1, 3, 8, 64 })
            {
                var x = RandomX(tokens * cols, tokens);
                for (int bits = 3; bits <= 8; bits++)
                {
                    var y = new float[tokens * rows];
                    backend.Multiply(m, bits, x, tokens, y);
                    AssertMatchesFloat64(m, bits, x, tokens, y, $"{path} b={bits} M={tokens} {rows}x{cols}");
                }
            }
        }
    }

    [TestMethod]
    public void TheWidestPathIsUsedByDefaultAndReported()
    {
        var backend = new CpuBitplaneBackend();
        Assert.AreEqual(BitplaneKernels.Best, backend.Path);
        StringAssert.Contains(backend.Name, BitplaneKernels.Best.ToString());
        Console.WriteLine($"paths here: {string.Join(", ", BitplaneKernels.SupportedPaths)}; GFNI: {BitplaneKernels.UsesGfni}");
    }

    [TestMethod]
    public void OneThreadAndManyThreadsGiveIdenticalResults()
    {
        var m = RandomMatrix(203, 300, 1);
        var x = RandomX(5 * 300, 2);
        var one = new float[5 * 203];
        var many = new float[5 * 203];
        using var single = new KernelThreadPool(1);
        using var quad = new KernelThreadPool(4);
        new CpuBitplaneBackend(BitplaneKernels.Best, single).Multiply(m, 5, x, 5, one);
        new CpuBitplaneBackend(BitplaneKernels.Best, quad).Multiply(m, 5, x, 5, many);
        CollectionAssert.AreEqual(one, many);
    }

    [TestMethod]
    public void BadArgumentsAreRejected()
    {
        var m = RandomMatrix(4, 40, 3);
        var backend = new CpuBitplaneBackend(KernelPath.Scalar);
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => backend.Multiply(m, 2, new float[40], 1, new float[4]));
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => backend.Multiply(m, 9, new float[40], 1, new float[4]));
        Assert.ThrowsExactly<ArgumentException>(() => backend.Multiply(m, 3, new float[39], 1, new float[4]));
        Assert.ThrowsExactly<ArgumentException>(() => backend.Multiply(m, 3, new float[80], 2, new float[4]));
    }

    [TestMethod]
    public void IlgpuKernelOnTheCpuAcceleratorEqualsFloat64Reference()
    {
        using var backend = IlgpuBitplaneBackend.CreateCpu();
        foreach (var (rows, cols) in new[] { (7, 100), (3, 1040) })
        {
            var m = RandomMatrix(rows, cols, rows + cols);
            foreach (int tokens in new[] { 1, 3, 8, 64 })
            {
                var x = RandomX(tokens * cols, 7 * tokens);
                for (int bits = 3; bits <= 8; bits++)
                {
                    var y = new float[tokens * rows];
                    backend.Multiply(m, bits, x, tokens, y);
                    AssertMatchesFloat64(m, bits, x, tokens, y, $"ILGPU CPU b={bits} M={tokens} {rows}x{cols}");
                }
            }
        }
    }
}
