using System.Reflection;
using AnyPrecML.Kernels;
using AnyPrecML.Models;
using AnyPrecML.Quantization;

namespace AnyPrecML.Tests;

[TestClass]
public sealed class KernelTests
{
    /// <summary>A random any-precision matrix (seed <paramref name="seedBits"/>, parent 8) built through the quantizer.</summary>
    internal static BitplaneMatrix RandomMatrix(int rows, int cols, int seed, int seedBits = 3)
    {
        var rng = new Random(seed);
        var ones = Enumerable.Repeat(1f, cols).ToArray();
        var q = new RowQuantization[rows];
        for (int r = 0; r < rows; r++)
        {
            var v = new float[cols];
            for (int j = 0; j < cols; j++) v[j] = (float)TestData.Gaussian(rng);
            q[r] = RowQuantizer.Quantize(v, ones, seedBits, 8, (ulong)r);
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
        Assert.IsFalse(double.IsNaN(worst), $"{what}: NaN in the output"); // IsLessThan orders NaN below every bound
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
            var backend = new CpuBitplaneBackend(path, pool, KernelAccuracy.Float32);
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

    /// <summary>
    /// Planes of 64 KB or more are padded with zero rows (<see cref="BitplaneMatrix.PaddedPlaneRows"/>), so a plane's rows
    /// start <see cref="BitplaneMatrix.PlaneRows"/> rows after the last plane's. The planes read back exactly as given,
    /// the codes decode as an independent walk over the given planes says, and every path at both accuracies multiplies
    /// the padded matrix as the float64 reference does (the other shapes here are too small to be padded).
    /// </summary>
    [TestMethod]
    public void PaddedPlanesReadBackAsGivenAndMultiplyOnEveryPath()
    {
        const int rows = 256, cols = 2048, words = cols / 32, seedBits = 3;
        var rng = new Random(17);
        var planes = Enumerable.Range(0, 8 * rows * words).Select(_ => (uint)rng.NextInt64(0, 1L << 32)).ToArray();
        var tables = Enumerable.Range(seedBits, 8 - seedBits + 1)
            .Select(b => Enumerable.Range(0, rows << b).Select(_ => (Half)TestData.Gaussian(rng)).ToArray()).ToArray();
        var m = BitplaneMatrix.Create("padded", rows, cols, seedBits, 8, planes, tables);
        Assert.AreEqual(264, m.PlaneRows, "256 rows of 256 bytes: 64 KB a plane, moved 2 KB on by 8 rows");
        for (int p = 0; p < 8; p++) CollectionAssert.AreEqual(planes.AsSpan(p * rows * words, rows * words).ToArray(), m.Plane(p).ToArray(), $"plane {p}");
        foreach (int bits in new[] { 3, 8 })
        {
            var w = m.Dequantize(bits);
            for (int r = 0; r < rows; r += 37)
                for (int j = 0; j < cols; j += 13)
                {
                    int code = 0;
                    for (int p = 0; p < bits; p++) code = code << 1 | (int)(planes[(p * rows + r) * words + j / 32] >> (j % 32) & 1);
                    Assert.AreEqual((float)tables[bits - seedBits][(r << bits) + code], w[r * cols + j], $"b={bits} ({r}, {j})");
                }
        }
        using var pool = new KernelThreadPool(2);
        foreach (var path in BitplaneKernels.SupportedPaths)
            foreach (var accuracy in new[] { KernelAccuracy.Float32, KernelAccuracy.Int8 })
            {
                var backend = new CpuBitplaneBackend(path, pool, accuracy);
                foreach (int tokens in new[] { 1, 3, 9 })
                {
                    var x = RandomX(tokens * cols, 5 * tokens);
                    foreach (int bits in new[] { 3, 6, 8 })
                    {
                        var y = new float[tokens * rows];
                        backend.Multiply(m, bits, x, tokens, y);
                        if (accuracy == KernelAccuracy.Float32) AssertMatchesFloat64(m, bits, x, tokens, y, $"{backend.Name} b={bits} M={tokens}");
                        else AssertWithinInt8Bound(m, bits, x, tokens, y);
                    }
                }
            }
        // The ILGPU kernel (on its CPU accelerator) takes the same stride.
        using var ilgpu = IlgpuBitplaneBackend.CreateCpu();
        var x1 = RandomX(cols, 3);
        foreach (int bits in new[] { 3, 8 })
        {
            var y = new float[rows];
            ilgpu.Multiply(m, bits, x1, 1, y);
            AssertMatchesFloat64(m, bits, x1, 1, y, $"ILGPU CPU b={bits}");
        }
    }

    /// <summary>
    /// <see cref="BitplaneMatrix.PaddedPlaneRows"/> against a brute-force search: the fewest rows at or above the given
    /// ones that keep every two of eight consecutive planes at least 2 KB apart modulo 64 KB; planes under 64 KB as
    /// they are. Includes the 1.1B and 7B shapes, whose unpadded planes are whole multiples of 64 KB apart.
    /// </summary>
    [TestMethod]
    public void PaddedPlaneRowsAreTheFewestThatSpreadEightPlanes()
    {
        static long Gap(long planeBytes) => Enumerable.Range(1, 7).Min(d => Math.Min(d * planeBytes % 65536, 65536 - d * planeBytes % 65536));
        (int Rows, int Cols)[] shapes = [(64, 64), (255, 2048), (256, 2048), (2048, 2048), (2560, 2048), (5632, 2048), (2048, 5632),
            (4096, 4096), (11008, 4096), (4096, 11008), (32000, 2048), (1000, 100), (3000, 1000), (777, 3333)];
        foreach (var (rows, cols) in shapes)
        {
            long rowBytes = 4L * ((cols + 31) / 32);
            int padded = BitplaneMatrix.PaddedPlaneRows(rows, cols);
            if (rows * rowBytes < 65536) { Assert.AreEqual(rows, padded, $"{rows}x{cols}"); continue; }
            int expected = Enumerable.Range(rows, 257).First(r => Gap(r * rowBytes) >= 2048);
            Assert.AreEqual(expected, padded, $"{rows}x{cols}");
        }
        Assert.AreEqual(5640, BitplaneMatrix.PaddedPlaneRows(5632, 2048));
        Assert.AreEqual(2051, BitplaneMatrix.PaddedPlaneRows(2048, 5632));
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
        new CpuBitplaneBackend(BitplaneKernels.Best, single, KernelAccuracy.Float32).Multiply(m, 5, x, 5, one);
        new CpuBitplaneBackend(BitplaneKernels.Best, quad, KernelAccuracy.Float32).Multiply(m, 5, x, 5, many);
        CollectionAssert.AreEqual(one, many);
    }

    [TestMethod]
    [Timeout(60_000, CooperativeCancellation = true)]
    public void PoolCompletesManyBackToBackCallsWithMoreThreadsThanCores()
    {
        // More workers than cores, calls back to back and spaced out: workers race between spinning,
        // sleeping and the next call. Every item must run exactly once per call, and no call may hang.
        using var pool = new KernelThreadPool(Environment.ProcessorCount + 2);
        var job = new CountingJob(97);
        for (int call = 0; call < 3000; call++)
        {
            if (call % 500 == 0) Thread.Sleep(2); // lets the workers fall asleep now and then
            Array.Clear(job.Hits);
            pool.Run(job, 97, 3);
            foreach (int h in job.Hits) Assert.AreEqual(1, h, $"call {call}");
        }
    }

    private sealed class CountingJob(int items) : IRangeJob
    {
        public readonly int[] Hits = new int[items];
        public void Execute(int start, int end) { for (int i = start; i < end; i++) Interlocked.Increment(ref Hits[i]); }
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

    public static IEnumerable<object[]> Int8Shapes => [[33, 1040], [8, 2081], [5, 100], [6, 512], [3, 767]];

    /// <summary>
    /// The int8 level: every path gives exactly the scalar int8 reference's outputs (integer sums, one shared
    /// rescale), and that reference stays within the bound stated on <see cref="KernelAccuracy.Int8"/> of the
    /// float64 product, at every width 2..8 and at 1, 2, 3, 4, 6 and 9 tokens (one token, the fused few-token kernels, and
    /// every remainder of the 4-token tiles), on shapes with whole and partial 256-column blocks and odd row counts.
    /// </summary>
    [TestMethod]
    [DynamicData(nameof(Int8Shapes))]
    public void Int8PathsEqualTheScalarInt8ReferenceWhichStaysWithinItsBound(int rows, int cols)
    {
        var m = RandomMatrix(rows, cols, rows + 2 * cols, seedBits: 2);
        var paths = BitplaneKernels.SupportedPaths;
        var ran = new List<string>();
        using var pool = new KernelThreadPool(2);
        var reference = new CpuBitplaneBackend(KernelPath.Scalar, pool, KernelAccuracy.Int8);
        foreach (int tokens in new[] { 1, 2, 3, 4, 6, 9 })
        {
            var x = RandomX(tokens * cols, 11 * tokens);
            for (int bits = 2; bits <= 8; bits++)
            {
                var expected = new float[tokens * rows];
                reference.Multiply(m, bits, x, tokens, expected);
                AssertWithinInt8Bound(m, bits, x, tokens, expected);
                foreach (var path in paths.Where(p => p != KernelPath.Scalar))
                {
                    var backend = new CpuBitplaneBackend(path, pool, KernelAccuracy.Int8);
                    var y = new float[tokens * rows];
                    backend.Multiply(m, bits, x, tokens, y);
                    CollectionAssert.AreEqual(expected, y, $"{backend.Name}: b={bits} M={tokens} {rows}x{cols}");
                    if (bits == 2 && tokens == 1) ran.Add(backend.Name);
                }
            }
        }
        Console.WriteLine($"int8 paths checked against the scalar int8 reference: {string.Join("; ", ran)}");
        Assert.IsNotEmpty(ran, "no vector path ran");
        Assert.Contains(new CpuBitplaneBackend(pool: pool).Name, ran, "the path this machine uses by default must be among those checked");
    }

    /// <summary>
    /// Fused products (q,k,v or gate,up: one x, several matrices of different rows) equal the separate products bit for
    /// bit, concatenated per token, on every path and both accuracies, for one and several tokens.
    /// </summary>
    [TestMethod]
    public void FusedProductsEqualTheSeparateProductsConcatenatedPerToken()
    {
        using var pool = new KernelThreadPool(2);
        BitplaneMatrix[] ws = [RandomMatrix(40, 300, 1, seedBits: 2), RandomMatrix(8, 300, 2, seedBits: 2), RandomMatrix(13, 300, 3, seedBits: 2)];
        int total = ws.Sum(w => w.Rows);
        foreach (var accuracy in Enum.GetValues<KernelAccuracy>())
            foreach (var path in BitplaneKernels.SupportedPaths)
            {
                var backend = new CpuBitplaneBackend(path, pool, accuracy);
                foreach (int tokens in new[] { 1, 2, 3, 4, 5 })
                    foreach (int bits in new[] { 2, 3, 5, 8 })
                    {
                        var x = RandomX(tokens * 300, tokens + bits);
                        foreach (int[] widths in new[] { new[] { bits, bits, bits }, new[] { bits, 8, 2 } }) // one width, and a profile's mixed ones (one int8 pass too)
                        {
                            var fused = new float[tokens * total];
                            backend.Multiply(ws, widths, x, tokens, fused);
                            int offset = 0;
                            for (int i = 0; i < ws.Length; i++)
                            {
                                var w = ws[i];
                                var alone = new float[tokens * w.Rows];
                                backend.Multiply(w, widths[i], x, tokens, alone);
                                for (int t = 0; t < tokens; t++)
                                    CollectionAssert.AreEqual(alone.AsSpan(t * w.Rows, w.Rows).ToArray(), fused.AsSpan(t * total + offset, w.Rows).ToArray(),
                                        $"{backend.Name}: b={string.Join(",", widths)} M={tokens} matrix at {offset}, token {t}");
                                offset += w.Rows;
                            }
                        }
                    }
            }
        Assert.Throws<ArgumentException>(() => new CpuBitplaneBackend(pool: pool).Multiply([ws[0], RandomMatrix(4, 64, 9)], [3, 3], new float[300], 1, new float[44]));
    }

    [TestMethod]
    [DataRow("BF16")]
    [DataRow("F16")]
    [DataRow("F32")]
    public void Int8HeadFromACheckpointTensorRowByRowEqualsTheOneFromItsFp32Copy(string dtype)
    {
        int rows = 300, cols = 77;
        var dt = DTypes.Parse(dtype)!.Value;
        var w = RandomX(rows * cols, 5);
        using var dir = TestData.NewTempDir();
        string path = dir["head.safetensors"];
        SafetensorsWriter.Write(path, [TensorToWrite.FromFloats("head", w, [rows, cols], dt)]);
        var (file, tensors, _) = SafetensorsReader.Open(path);
        using (file)
        {
            var t = tensors.Single();
            var expected = Int8Matrix.Quantize("head", t.ToFloatArray(), rows, cols);
            var actual = Int8Matrix.Quantize(t);
            CollectionAssert.AreEqual(expected.Scale, actual.Scale);
            CollectionAssert.AreEqual(expected.Values, actual.Values);
        }
        // A NaN or an infinity anywhere is an error naming the first such row (a NaN's row once quantized with scale 1).
        foreach (float bad in new[] { float.NaN, float.PositiveInfinity, float.NegativeInfinity })
        {
            var v = (float[])w.Clone();
            v[250 * cols + 9] = 1; v[123 * cols + 4] = bad; v[201 * cols] = bad;
            var e = Assert.ThrowsExactly<ArgumentException>(() => Int8Matrix.Quantize("head", v, rows, cols));
            StringAssert.Contains(e.Message, "row 123", $"{bad}");
        }
    }

    /// <summary>
    /// The dense int8 head: every vector path equals the scalar int8 reference bit for bit, at 1..9 tokens, with
    /// partial 32-byte rows; the reference stays within the int8 bound of the float64 product of the fp32 matrix
    /// (½·s_x·Σ|w| + ½·s_w·Σ|x|, s_w = max|w_r|/127); and a token's outputs do not depend on the other tokens in the call.
    /// </summary>
    [TestMethod]
    public void Int8DenseHeadPathsEqualTheScalarReferenceWhichStaysWithinItsBound()
    {
        using var pool = new KernelThreadPool(2);
        var ran = new List<string>();
        foreach (var (rows, cols) in new[] { (37, 100), (5, 543), (33, 64), (70, 2081) })
        {
            var w = RandomX(rows * cols, rows * 31 + cols);
            var m = Int8Matrix.Quantize("head", w, rows, cols);
            var reference = new CpuBitplaneBackend(KernelPath.Scalar, pool);
            foreach (int tokens in new[] { 1, 3, 6, 9 })
            {
                var x = RandomX(tokens * cols, 7 * tokens + cols);
                var expected = new float[tokens * rows];
                reference.Multiply(m, x, tokens, expected);
                for (int t = 0; t < tokens; t++)
                {
                    var xt = x.AsSpan(t * cols, cols);
                    double sx = Math.Abs(System.Numerics.Tensors.TensorPrimitives.MaxMagnitude(xt)) / 127.0, sumAbsX = 0;
                    foreach (float v in xt) sumAbsX += Math.Abs(v);
                    var alone = new float[rows];
                    reference.Multiply(m, xt, 1, alone);
                    for (int r = 0; r < rows; r++)
                    {
                        double exact = 0, sumAbsW = 0, sw = 0;
                        for (int j = 0; j < cols; j++) { exact += (double)w[r * cols + j] * xt[j]; sumAbsW += Math.Abs(w[r * cols + j]); sw = Math.Max(sw, Math.Abs(w[r * cols + j])); }
                        double bound = 0.5 * sx * sumAbsW + 0.5 * sw / 127 * sumAbsX + 1e-5 * sumAbsW * sx * 127;
                        Assert.IsLessThanOrEqualTo(bound, Math.Abs(expected[t * rows + r] - exact), $"row {r} token {t} of {tokens}, {rows}x{cols}");
                        Assert.AreEqual(alone[r], expected[t * rows + r], $"token {t} alone vs among {tokens}, row {r}");
                    }
                }
                foreach (var path in BitplaneKernels.SupportedPaths.Where(p => p != KernelPath.Scalar))
                {
                    var backend = new CpuBitplaneBackend(path, pool);
                    var y = new float[tokens * rows];
                    backend.Multiply(m, x, tokens, y);
                    CollectionAssert.AreEqual(expected, y, $"{path}: M={tokens} {rows}x{cols}");
                    if (tokens == 1 && rows == 37) ran.Add(path.ToString());
                }
            }
        }
        Console.WriteLine($"int8 head paths checked against the scalar reference: {string.Join(", ", ran)}");
        Assert.Contains(BitplaneKernels.Best.ToString(), ran.Append("Scalar"), "the path this machine uses must be among those checked");
    }

    /// <summary>
    /// The vectorised activation quantizer writes the same bytes, scale and sum as its scalar reference in every
    /// column order, on lengths with whole and partial blocks, with exact half steps (round half to even) and zeros.
    /// </summary>
    [TestMethod]
    public void Int8ActivationQuantizerEqualsItsScalarReference()
    {
        var rng = new Random(5);
        foreach (int cols in new[] { 1, 7, 64, 100, 255, 256, 257, 543, 1040, 2081, 5632 })
            foreach (var order in Enum.GetValues<Int8ColumnOrder>())
                foreach (int kind in new[] { 0, 1, 2 })
                {
                    // kind 0: Gaussian; 1: max 127 and half steps (inv = 1, ties round to even); 2: all zero.
                    var x = Enumerable.Range(0, cols).Select(j => kind switch
                    {
                        0 => (float)TestData.Gaussian(rng),
                        1 => j == cols / 2 ? 127f : (rng.Next(-127, 127) + 0.5f),
                        _ => 0f,
                    }).ToArray();
                    int stride = BitplaneKernels.Int8Stride(order, cols);
                    sbyte[] x8 = Fill<sbyte>(stride, 77), x8r = Fill<sbyte>(stride, -5), sign = Fill<sbyte>(stride, 3), signR = Fill<sbyte>(stride, 4);
                    byte[] abs = Fill<byte>(stride, 9), absR = Fill<byte>(stride, 200);
                    var got = BitplaneKernels.QuantizeActivations(x, x8, abs, sign, order);
                    var want = BitplaneKernels.QuantizeActivationsScalar(x, x8r, absR, signR, order);
                    string what = $"{order} cols={cols} kind={kind}";
                    Assert.AreEqual(want, got, what);
                    CollectionAssert.AreEqual(x8r, x8, what);
                    CollectionAssert.AreEqual(absR, abs, what);
                    CollectionAssert.AreEqual(signR, sign, what);
                    if (kind == 1) Assert.AreEqual(x.Sum(v => (int)Math.Round(v, MidpointRounding.ToEven)), got.Sum, what);
                }

        static T[] Fill<T>(int n, T value) => Enumerable.Repeat(value, n).ToArray();
    }

    private static void AssertWithinInt8Bound(BitplaneMatrix m, int bits, float[] x, int tokens, float[] y)
    {
        int rows = m.Rows, cols = m.Cols;
        var w = m.Dequantize(bits);
        for (int t = 0; t < tokens; t++)
        {
            var xt = x.AsSpan(t * cols, cols);
            double sx = Math.Abs(System.Numerics.Tensors.TensorPrimitives.MaxMagnitude(xt)) / 127.0, sumAbsX = 0;
            foreach (float v in xt) sumAbsX += Math.Abs(v);
            for (int r = 0; r < rows; r++)
            {
                var row = w.AsSpan(r * cols, cols);
                double exact = 0, sumAbsW = 0;
                for (int j = 0; j < cols; j++) { exact += (double)row[j] * xt[j]; sumAbsW += Math.Abs(row[j]); }
                var table = m.Table(bits).Slice(r << bits, 1 << bits).ToArray().Select(h => (double)h).ToArray();
                double st = (table.Max() - table.Min()) / 254.0;
                double bound = 0.5 * sx * sumAbsW + 0.5 * st * sumAbsX + 1e-5 * (sumAbsW * sx * 127);
                Assert.IsLessThanOrEqualTo(bound, Math.Abs(y[t * rows + r] - exact), $"b={bits} M={tokens} row {r} of {rows}x{cols}");
            }
        }
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

    /// <summary>
    /// Two batched tokens take the in-register route on every vector int8 path (the point of it: two sequences decode
    /// 1.4-1.6× faster than one), one token and five or more never ask, and the 128-bit path keeps its own loop. The
    /// routes' equality is checked by the kernel suite under ANYPREC_FEW_TOKENS (KernelIsaLevelTests).
    /// </summary>
    [TestMethod]
    public void TwoTokensMeetTheLookedUpBytesInRegistersOnEveryVectorInt8Path()
    {
        foreach (var path in new[] { KernelPath.Vector512, KernelPath.Vector256 })
            for (int bits = 2; bits <= 5; bits++)
            {
                Assert.IsTrue(BitplaneKernels.FewTokensInRegisters(path, 2, bits), $"{path} b={bits}");
                Assert.IsFalse(BitplaneKernels.FewTokensInRegisters(path, 1, bits));
                Assert.IsFalse(BitplaneKernels.FewTokensInRegisters(path, 5, bits));
            }
        Assert.IsFalse(BitplaneKernels.FewTokensInRegisters(KernelPath.Vector128, 2, 3));
    }

    /// <summary>
    /// Every loop over rows, and every job the kernel pool runs, is compiled fully optimized at its first call. At tier 0
    /// the AVX2 int8 row loop left its prefetch helper out of line: a 512×2048 product at b = 6 took 143-153 µs against
    /// 60 µs optimized, for as long as the tiered JIT took to replace it (a generation's first tokens, a bench's first width).
    /// </summary>
    [TestMethod]
    public void EveryRowLoopAndPoolJobIsCompiledFullyOptimizedFromItsFirstCall()
    {
        const BindingFlags all = BindingFlags.Static | BindingFlags.Instance | BindingFlags.Public | BindingFlags.NonPublic;
        var rowLoops = typeof(BitplaneKernels).GetMethods(all).Where(m => m.Name.StartsWith("Rows", StringComparison.Ordinal)).ToList();
        var jobs = typeof(IRangeJob).Assembly.GetTypes().Where(t => t.IsClass && typeof(IRangeJob).IsAssignableFrom(t))
            .Select(t => t.GetMethod(nameof(IRangeJob.Execute), all)!).ToList();
        Assert.IsGreaterThanOrEqualTo(12, rowLoops.Count, string.Join(", ", rowLoops.Select(m => m.Name)));
        Assert.IsGreaterThanOrEqualTo(5, jobs.Count, string.Join(", ", jobs.Select(m => m.DeclaringType!.Name)));
        foreach (var m in rowLoops.Concat(jobs))
            Assert.IsTrue(m.MethodImplementationFlags.HasFlag(MethodImplAttributes.AggressiveOptimization), $"{m.DeclaringType!.Name}.{m.Name}");
    }
}

/// <summary>
/// The kernel suite again in child processes with instruction sets hidden from .NET, so that every path and every
/// instruction-set branch inside a path (AVX-VNNI or not, AVX2 under an AVX-512 CPU, 128-bit only) runs on any CI
/// machine: a path the CPU lacks is tested wherever it can run, and none is skipped where it can.
/// </summary>
[TestClass]
public sealed class KernelIsaLevelTests
{
    public static IEnumerable<object[]> Levels =>
    [
        ["DOTNET_EnableAVX512=0"],                          // AVX2 (+ AVX-VNNI where present) as on Zen 3 / client CPUs
        ["DOTNET_EnableAVX512=0;DOTNET_EnableAVXVNNI=0"],   // AVX2 + FMA only (Zen 2/3)
        ["DOTNET_EnableAVX2=0"],                            // 128-bit vectors only (the ARM64-like path)
        ["DOTNET_EnableAVXVNNI=0"],                         // AVX-512 without AVX-VNNI (Zen 4): the signed 512-bit products
        // Two to four tokens by the route the rule does not take at each level (FewTokensInRegisters): both must give
        // the same integers everywhere, including where the rule never sends them today.
        ["ANYPREC_FEW_TOKENS=tiles"],
        ["DOTNET_EnableAVXVNNI=0;ANYPREC_FEW_TOKENS=tiles"],
        ["ANYPREC_FEW_TOKENS=registers"],
        ["DOTNET_EnableAVX512=0;ANYPREC_FEW_TOKENS=registers"],
        ["DOTNET_EnableAVX512=0;DOTNET_EnableAVXVNNI=0;ANYPREC_FEW_TOKENS=registers"],
    ];

    /// <summary>
    /// The AVX2 one-token block loops (b = 2..8, with and without AVX-VNNI) compile with every helper inlined: no call
    /// in their listings. When the products sink grew a few-token body, the b = 7, 8 loops went over the JIT's inlining
    /// budget, left the sink and the blend tree as calls, and one token at b = 8 ran 1.7-2.1× slower, with every test
    /// still passing. Read from the JIT's own listing (<c>DOTNET_JitDisasm</c>) of a child process running the int8 suite.
    /// </summary>
    [TestMethod]
    [DataRow("DOTNET_EnableAVX512=0")]
    [DataRow("DOTNET_EnableAVX512=0;DOTNET_EnableAVXVNNI=0")]
    public void OneTokenAvx2BlockLoopsInlineEveryHelper(string environment)
    {
        if (!System.Runtime.Intrinsics.X86.Avx2.IsSupported) Assert.Inconclusive("no AVX2 here: the loops cannot be compiled for it");
        string listing = Path.Combine(Path.GetTempPath(), $"anyprec-jit-{Guid.NewGuid():N}.txt");
        try
        {
            var psi = new System.Diagnostics.ProcessStartInfo("dotnet", [typeof(KernelTests).Assembly.Location,
                "--filter", "FullyQualifiedName~AnyPrecML.Tests.KernelTests.Int8Paths", "--no-ansi"])
            { RedirectStandardOutput = true, RedirectStandardError = true };
            foreach (var pair in environment.Split(';')) psi.Environment[pair.Split('=')[0]] = pair.Split('=')[1];
            psi.Environment["DOTNET_JitDisasm"] = "NarrowBlocks MidBlocks WideBlocks";
            psi.Environment["DOTNET_JitStdOutFile"] = listing;
            using var child = System.Diagnostics.Process.Start(psi)!;
            var stderr = child.StandardError.ReadToEndAsync();
            string output = child.StandardOutput.ReadToEnd();
            child.WaitForExit();
            Assert.AreEqual(0, child.ExitCode, $"{output}\n{stderr.Result}");
            var methods = File.ReadAllText(listing).Split("; Assembly listing for method ").Where(m => m.Contains("+ProductSink]")).ToList();
            Assert.AreEqual(7, methods.Count, "one one-token loop per width 2..8 (Narrow 2-4, Mid 5-6, Wide 7-8)");
            foreach (var m in methods)
                Assert.DoesNotContain("call ", m, $"{environment}: {m[..m.IndexOf('(')]} calls out of its loop");
        }
        finally { File.Delete(listing); }
    }

    [TestMethod]
    [DynamicData(nameof(Levels))]
    public void KernelSuitePassesWithInstructionSetsHidden(string environment)
    {
        var psi = new System.Diagnostics.ProcessStartInfo("dotnet", [typeof(KernelTests).Assembly.Location,
            "--filter", "FullyQualifiedName~AnyPrecML.Tests.KernelTests.Every|FullyQualifiedName~AnyPrecML.Tests.KernelTests.Int8|FullyQualifiedName~AnyPrecML.Tests.KernelTests.Fused|FullyQualifiedName~AnyPrecML.Tests.CausalAttentionTests", "--output", "Detailed", "--no-ansi"])
        { RedirectStandardOutput = true, RedirectStandardError = true };
        foreach (var pair in environment.Split(';')) psi.Environment[pair.Split('=')[0]] = pair.Split('=')[1];
        using var child = System.Diagnostics.Process.Start(psi)!;
        var stderr = child.StandardError.ReadToEndAsync();
        // The runner colours its lines when it thinks it may: drop the escape codes before reading them.
        string output = System.Text.RegularExpressions.Regex.Replace(child.StandardOutput.ReadToEnd(), "\u001B\\[[0-9;]*m", "");
        child.WaitForExit();
        Assert.AreEqual(0, child.ExitCode, $"{environment}:\n{output}\n{stderr.Result}");
        var ran = output.Split('\n').Where(l => l.Contains("int8 paths checked")).Select(l => l.Trim()).Distinct().ToList();
        Assert.IsNotEmpty(ran, $"{environment}: the child ran no int8 path check:\n{output}");
        Console.WriteLine($"{environment}: {ran[0]}");
        StringAssert.Contains(output, "passed EveryCpuPathEqualsFloat64ReferenceAtEveryWidthAndTokenCount", $"{environment}: the fp32 paths must run too");
        StringAssert.Contains(output, "passed head width 12: the vector loops' tails", $"{environment}: the decode attention (Vector<float> as wide as the level allows) must run too");
        Assert.DoesNotContain("failed: ", output.Replace("failed: 0", ""), environment);
        if (environment.Contains("EnableAVX2=0")) Assert.DoesNotContain("Vector256", ran[0], "AVX2 hidden: no 256-bit path may run");
        else if (environment.Contains("EnableAVX512=0")) Assert.DoesNotContain("Vector512", ran[0], "AVX-512 hidden: no 512-bit path may run");
        else if (BitplaneKernels.SupportsInt8(KernelPath.Vector512)) StringAssert.Contains(ran[0], "Vector512", $"{environment}: the 512-bit int8 path must run where the CPU has it");
        if (environment.Contains("AVXVNNI=0")) Assert.DoesNotContain("VNNI", ran[0]);
        // The forced route must have reached the child's kernels (else these levels would rerun the rule's route).
        if (environment.Contains("ANYPREC_FEW_TOKENS=registers")) StringAssert.Contains(ran[0], "2-4 tokens forced into registers");
        if (environment.Contains("ANYPREC_FEW_TOKENS=tiles")) StringAssert.Contains(ran[0], "2-4 tokens forced through tiles");
    }
}
